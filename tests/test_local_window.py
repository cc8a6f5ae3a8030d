"""Tiled local-window attention primitives against explicit float64 window loops."""
import pytest
import torch
import torch.nn.functional as F

from networks.layers.local_window import (dense_window_aggregate, dense_window_logits,
                                          local_window_aggregate, local_window_logits,
                                          window_valid_mask)


def _loop_logits(q, k, m, dil):
    h, w = q.shape[-2:]
    R = m * dil
    kp = F.pad(k, (R, R, R, R))
    return torch.stack([(q * kp[:, :, i * dil:i * dil + h, j * dil:j * dil + w]).sum(1)
                        for i in range(2 * m + 1) for j in range(2 * m + 1)], 1)


def _loop_aggregate(a, v, m, dil):
    h, w = v.shape[-2:]
    R = m * dil
    vp = F.pad(v, (R, R, R, R))
    out = torch.zeros_like(v)
    n = 0
    for i in range(2 * m + 1):
        for j in range(2 * m + 1):
            out += a[:, n:n + 1] * vp[:, :, i * dil:i * dil + h, j * dil:j * dil + w]
            n += 1
    return out


@pytest.mark.parametrize('h,w,m,dil,tile', [(11, 17, 7, 1, 16), (5, 3, 7, 1, 16),
                                            (20, 9, 2, 2, 4), (33, 18, 7, 1, 8)])
def test_matches_window_loops(h, w, m, dil, tile):
    g = torch.Generator().manual_seed(h * w)
    q, k = (torch.randn(3, 6, h, w, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(3, 5, h, w, generator=g, dtype=torch.float64)
    a = torch.randn(3, (2 * m + 1) ** 2, h, w, generator=g, dtype=torch.float64)
    torch.testing.assert_close(local_window_logits(q, k, m, dil, tile), _loop_logits(q, k, m, dil))
    torch.testing.assert_close(local_window_aggregate(a, v, m, dil, tile),
                               _loop_aggregate(a, v, m, dil))
    # The upstream-style dense path (the benchmark's baseline) computes the same sums.
    torch.testing.assert_close(dense_window_logits(q, k, m, dil), _loop_logits(q, k, m, dil))
    torch.testing.assert_close(dense_window_aggregate(a, v, m, dil), _loop_aggregate(a, v, m, dil))


def test_valid_mask_marks_in_image_positions():
    valid = window_valid_mask(3, 4, 1, 1)
    assert valid.shape == (9, 3, 4)
    # top-left neighbour of the top-left pixel is outside; the centre offset is always inside
    assert not valid[0, 0, 0] and valid[4].all()
    assert valid.sum().item() == sum((0 <= y + dy < 3) and (0 <= x + dx < 4)
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                                     for y in range(3) for x in range(4))


def test_cached_constants_survive_inference_mode():
    """Constants first built under inference_mode must still work in training."""
    q = torch.randn(1, 4, 9, 13)
    with torch.inference_mode():
        local_window_logits(q, q)
        window_valid_mask(9, 13, 7, 1)
    q.requires_grad_(True)
    attn = local_window_logits(q, q).masked_fill(~window_valid_mask(9, 13, 7, 1), -1e8)
    local_window_aggregate(attn.softmax(1), q).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
