"""Our weight recipe (tests/golden_weights.py) reproduces the published seed-0 checksums.

The golden model outputs were made with these weights, so a mismatch here would make every golden
model test meaningless. Checked: the README's test vectors, and per key (for deaott, r50_deaotl,
aott) the shape, the float64 sum and abs sum (rel 1e-12), the first three values (exact), plus
the model totals.
"""
import json
import math
import zlib

import numpy as np
import pytest
import torch

from tests.conftest import shared_path
from tests.golden_weights import (key_base, read_keyfile, recipe_for_module, recipe_state_dict,
                                  splitmix64, swin_relative_position_index, uniform)

REL = 1e-12


def test_published_test_vectors():
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert zlib.crc32(b'decoder.conv_out.bias') == 2166307394
    assert key_base(0, 'decoder.conv_out.bias') == 0x06063C993585E892
    u = uniform(0, 'decoder.conv_out.bias', 3)
    assert u.tolist() == [0.16663053819624984, 0.9369972031287628, 0.3755319843019441]


def test_vectorised_hash_equals_scalar_hash():
    xs = [0, 1, 2 ** 63, 2 ** 64 - 1, 0x0123456789ABCDEF]
    vec = splitmix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in vec] == [splitmix64(x) for x in xs]


@pytest.fixture(scope='module')
def checksums():
    with open(shared_path('reference', 'golden', 'weights_checksums_seed0.json')) as f:
        return json.load(f)


@pytest.mark.parametrize('model_id', ['deaott', 'r50_deaotl', 'aott'])
def test_recipe_matches_published_checksums(model_id, checksums):
    ref = checksums['models'][model_id]
    entries = read_keyfile(shared_path('reference', 'state_dicts', f'sd_{model_id}.txt'))
    assert len(entries) == ref['n_keys']
    assert sum(kind == 'param' for _, _, kind in entries) == ref['n_param_keys']
    sd = recipe_state_dict(entries, seed=0)
    assert list(sd) == list(ref['keys'])

    total, total_abs, numel = 0.0, 0.0, 0
    for key, (shape, s, s_abs, first) in ref['keys'].items():
        t = sd[key]
        assert list(t.shape) == shape, key
        assert t.dtype == torch.float32, key
        a = t.numpy().reshape(-1).astype(np.float64)
        mine, mine_abs = float(np.sum(a)), float(np.sum(np.abs(a)))
        # Sums near zero (biases) have no relative meaning: scale the tolerance by the abs sum.
        assert math.isclose(mine, s, rel_tol=REL, abs_tol=REL * s_abs), (key, mine, s)
        assert math.isclose(mine_abs, s_abs, rel_tol=REL), (key, mine_abs, s_abs)
        assert a[:3].tolist() == first, key
        total, total_abs, numel = total + mine, total_abs + mine_abs, numel + a.size
    assert numel == ref['numel']
    assert math.isclose(total, ref['total_sum'], rel_tol=REL)
    assert math.isclose(total_abs, ref['total_abs_sum'], rel_tol=REL)


def test_relative_position_index_is_swin_canonical():
    # Independent construction: a key offset (dy, dx) in a W x W window maps to row-major index
    # of (dy + W - 1, dx + W - 1) in a (2W-1) x (2W-1) table.
    W = 7
    idx = swin_relative_position_index(W)
    assert idx.shape == (49, 49) and idx.dtype == np.int64
    for q in (0, 8, 24, 48):
        for k in (0, 6, 30, 48):
            dy, dx = q // W - k // W, q % W - k % W
            assert idx[q, k] == (dy + W - 1) * (2 * W - 1) + (dx + W - 1)
    assert idx.min() == 0 and idx.max() == (2 * W - 1) ** 2 - 1
    sd = recipe_state_dict([('a.attn.relative_position_index', (49, 49), 'buffer')])
    assert sd['a.attn.relative_position_index'].dtype == torch.int64
    assert torch.equal(sd['a.attn.relative_position_index'], torch.from_numpy(idx))


def test_recipe_for_module_uses_module_keys():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = recipe_for_module(m, seed=3)
    m.load_state_dict(sd, strict=True)
    assert sd['1.num_batches_tracked'].dtype == torch.int64
    assert int(sd['1.num_batches_tracked']) == 0
    # running_var = 0.5 + u, u in [0, 1); the 2-D weight uses fan_in = 3 * 3 * 3.
    assert bool(((sd['1.running_var'] >= 0.5) & (sd['1.running_var'] < 1.5)).all())
    assert float(sd['0.weight'].abs().max()) <= math.sqrt(3 / 27)
    assert not torch.equal(recipe_for_module(m, seed=4)['0.weight'], sd['0.weight'])


def test_read_keyfile_rejects_garbage(tmp_path):
    p = tmp_path / 'bad.txt'
    p.write_text('encoder.x [3, 4] param\nnot a line\n')
    with pytest.raises(ValueError, match='bad.txt:2'):
        read_keyfile(p)
