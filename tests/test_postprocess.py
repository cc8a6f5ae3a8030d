"""Cheaper post-processing, same labels: resize only the live ID channels, argmax once.

Upstream's evaluator resizes all 11 ID channels of the 1/4-resolution logits to the output
size, takes a softmax over them and an argmax (twice). ``resize_logits(..., live_only=True)``
resizes only background + the objects in use. These tests feed upstream's own decoder output
(``logits_4x`` of the golden engine fixture, golden/README.md §2.3) through both and demand
identical labels on every pixel, equal to the labels upstream wrote.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from networks.engines.aot_engine import AOTInferEngine
from networks.engines.postprocess import channel_argmax, resize_logits
from tests.golden_engine import golden

OUT_SIZE = (160, 262)   # the fixture's output (= crop) size
OBJ_NUMS = [3, 3, 3, 4, 4, 4, 4]  # objects known at frames 1..7 (object 4 arrives at frame 3)


def upstream_labels(logits_4x, size):
    """Upstream's evaluator: every channel resized, softmax, argmax (golden/README.md §2.2)."""
    logits = F.interpolate(logits_4x, size=size, mode='bilinear', align_corners=True)
    return torch.argmax(torch.softmax(logits, dim=1), dim=1)


@pytest.mark.parametrize('model_id', ['deaott', 'r50_deaotl', 'aott'])
def test_live_channel_labels_equal_upstream_on_the_golden_fixture(model_id):
    fixture = golden(f'engine_{model_id}.npz')
    logits_all = torch.from_numpy(fixture['logits_4x'][:, 0])         # (7, 11, 41, 65)
    for t, (logits_4x, n) in enumerate(zip(logits_all, OBJ_NUMS)):
        logits_4x = logits_4x[None]
        assert (logits_4x[:, n + 1:] <= -1e9).all(), 'fixture: unused channels are the fill'
        ref = upstream_labels(logits_4x, OUT_SIZE)
        live = resize_logits(logits_4x, OUT_SIZE, [n], align_corners=True, live_only=True)
        assert live.shape == (1, n + 1) + OUT_SIZE
        ours = channel_argmax(torch.softmax(live, dim=1))
        assert torch.equal(ours, ref), f'frame {t + 1}: labels differ'
        # The probabilities of the live channels are the same numbers, not just the argmax.
        full = torch.softmax(F.interpolate(logits_4x, size=OUT_SIZE, mode='bilinear',
                                           align_corners=True), dim=1)
        assert torch.equal(torch.softmax(live, dim=1), full[:, :n + 1])
        if t + 1 != 3:  # frame 3 merges the new object's given mask into the prediction
            assert np.array_equal(ours[0].numpy(), fixture['labels_out'][t])


def test_several_sub_engines_keep_every_channel():
    """More than 10 objects: the soft aggregation clamps probabilities, so unused channels keep
    a little mass that upstream's probabilities include; live_only must not drop them."""
    calls = []

    class Sub:
        def __init__(self, n):
            self.n = n

        def decode_current_logits(self, output_size=None, live_only=False):
            calls.append(live_only)
            logits = torch.full((1, 11, 4, 5), -1e10)
            logits[:, :self.n + 1] = torch.arange(self.n + 1.).view(1, -1, 1, 1)
            return logits[:, :self.n + 1] if live_only else logits

    engine = AOTInferEngine.__new__(AOTInferEngine)
    engine.max_aot_obj_num = 10
    engine.aot_engines = [Sub(10), Sub(3)]
    merged = engine.decode_current_logits((4, 5), live_only=True)
    assert merged.shape[1] == 21 and calls == [False, False]
    engine.aot_engines = [Sub(3)]
    assert engine.decode_current_logits((4, 5), live_only=True).shape[1] == 4


def test_channel_argmax_equals_torch_argmax_ties_included():
    gen = torch.Generator().manual_seed(1)
    for C in (1, 2, 5, 11):
        x = torch.randint(-3, 4, (2, C, 37, 53), generator=gen).float()  # many exact ties
        assert torch.equal(channel_argmax(x), torch.argmax(x, dim=1))
        assert torch.equal(channel_argmax(x, keepdim=True), torch.argmax(x, dim=1, keepdim=True))
    with pytest.raises(ValueError, match='expects'):
        channel_argmax(torch.zeros(3, 4))
