"""Checkpoint loading/saving: upstream layouts, strictness, atomic writes."""
import os

import pytest
import torch
import torch.nn as nn

from utils.checkpoint import (CheckpointMismatchError, latest_checkpoint, list_checkpoints,
                              load_network, save_network)


class Tiny(nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3)
        self.register_buffer('running', torch.ones(4))
        if extra:
            self.conv_offset = nn.Linear(2, 2)


def _randomised(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn_like(t))
    return model


@pytest.mark.parametrize('layout', ['raw', 'state_dict', 'model', 'module'])
def test_upstream_layouts_load_exactly(tmp_path, layout):
    src = _randomised(Tiny())
    sd = src.state_dict()
    obj = {'raw': sd, 'state_dict': {'state_dict': sd, 'optimizer': {}},
           'model': {'model': sd}, 'module': {f'module.{k}': v for k, v in sd.items()}}[layout]
    path = tmp_path / 'c.pth'
    torch.save(obj, path)
    dst, report = load_network(Tiny(), str(path))
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v)
    assert report == {'missing': [], 'unexpected': [], 'new': []}


def test_mismatch_names_keys_and_shapes(tmp_path):
    sd = Tiny().state_dict()
    sd['encoder.weight'] = torch.zeros(5, 3, 3, 3)
    sd['stray.weight'] = torch.zeros(1)
    del sd['running']
    path = tmp_path / 'bad.pth'
    torch.save({'state_dict': sd}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_network(Tiny(), str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert 'encoder.weight' in msg and '(5, 3, 3, 3)' in msg and '(4, 3, 3, 3)' in msg
    assert 'stray.weight' in msg and 'running' in msg


def test_new_module_allowed_by_prefix(tmp_path):
    src = _randomised(Tiny())
    path = tmp_path / 'vanilla.pth'
    torch.save({'state_dict': src.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError):
        load_network(Tiny(extra=True), str(path))
    dst, report = load_network(Tiny(extra=True), str(path), allow_missing_prefixes=('conv_offset',))
    assert sorted(report['new']) == ['conv_offset.bias', 'conv_offset.weight']
    assert torch.equal(dst.encoder.weight, src.encoder.weight)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'junk.pth'
    path.write_bytes(b'not a torch file')
    with pytest.raises(RuntimeError, match='junk.pth'):
        load_network(Tiny(), str(path))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_network(Tiny(), str(tmp_path / 'missing.pth'))


def test_save_is_atomic_and_upstream_format(tmp_path, monkeypatch):
    net = _randomised(Tiny())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = save_network(net, 10, str(tmp_path), optimizer=opt)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {'state_dict', 'optimizer'}
    assert torch.equal(ckpt['state_dict']['encoder.weight'], net.encoder.weight)

    # A crash in the middle of writing leaves the previous file intact and no temp file.
    def boom(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(KeyboardInterrupt):
        save_network(_randomised(Tiny()), 10, str(tmp_path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['state_dict']['encoder.weight'],
                       net.encoder.weight)
    assert os.listdir(tmp_path) == ['save_step_10.pth']


def test_latest_and_pruning(tmp_path):
    net = Tiny()
    for step in (5, 100, 20, 7):
        save_network(net, step, str(tmp_path), max_keep=3)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [7, 20, 100]
    assert latest_checkpoint(str(tmp_path))[0] == 100
