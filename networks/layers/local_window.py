"""Exact 15x15 (or any odd) windowed attention primitives in pure PyTorch.

Short-term attention lets every query at ``(y, x)`` look at the keys at
``(y + dy*dil, x + dx*dil)`` for ``dy, dx in [-m, m]`` (``m = max_dis``), with keys outside
the image counting as zero vectors (and masked before the softmax).

Upstream computes the logits with an optional CUDA correlation op (or pad+unfold) and
aggregates with a dense ``(L, (h+2m)(w+2m))`` matrix per head. Here both steps work on
square query tiles of ``t x t``: a tile only needs the ``(t+2R)^2`` keys around it
(``R = m*dil``), so each tile is one small dense matmul. Cost per query is ``(t+2R)^2``
instead of ``(h+2R)(w+2R)`` (for t=16 at 480p: 900 vs 2924) and nothing of size
``L x L`` is ever built. The results equal the direct sums up to float rounding.

Window index ``n = i * W + j`` (row-major, ``W = 2m+1``) addresses offset
``(dy, dx) = ((i - m) * dil, (j - m) * dil)``, matching upstream's correlation layout.
"""
import functools

import torch
import torch.nn.functional as F

DEFAULT_TILE = 16


def _cached_constant(fn):
    """Cache a constant index/mask tensor per argument tuple.

    The tensors are built outside ``torch.inference_mode``: a cached inference tensor would
    break autograd when the same process later trains (it is saved for backward).
    """
    cached = functools.lru_cache(maxsize=32)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        with torch.inference_mode(False):
            return cached(*args)
    return wrapper


@_cached_constant
def _tile_window_index(tile, max_dis, dilation):
    """``(t*t, W*W)`` flat positions inside a tile's ``(t+2R)^2`` neighbourhood."""
    R = max_dis * dilation
    P = tile + 2 * R
    qy, qx = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing='ij')
    d = torch.arange(-max_dis, max_dis + 1) * dilation
    dy, dx = torch.meshgrid(d, d, indexing='ij')
    rows = qy.reshape(-1, 1) + R + dy.reshape(1, -1)
    cols = qx.reshape(-1, 1) + R + dx.reshape(1, -1)
    return rows * P + cols


@_cached_constant
def _window_valid(h, w, max_dis, dilation):
    """``(W*W, h, w)`` bool: window position lies inside the image."""
    d = torch.arange(-max_dis, max_dis + 1) * dilation
    y = torch.arange(h).view(1, h, 1)
    x = torch.arange(w).view(1, 1, w)
    vy = ((y + d.view(-1, 1, 1)) >= 0) & ((y + d.view(-1, 1, 1)) < h)   # (W, h, 1)
    vx = ((x + d.view(-1, 1, 1)) >= 0) & ((x + d.view(-1, 1, 1)) < w)   # (W, 1, w)
    return (vy[:, None] & vx[None, :]).reshape(-1, h, w)


def window_valid_mask(h, w, max_dis=7, dilation=1, device=None):
    return _window_valid(h, w, max_dis, dilation).to(device)


def out_of_image_penalty(dtype):
    """Upstream's fill for window positions outside the image: 1e8, or 1e4 in half precision
    (which cannot hold 1e8). The masked softmax weight is exactly zero either way."""
    return 1e8 if dtype in (torch.float32, torch.float64) else 1e4


def mask_out_of_image(logits, max_dis=7, dilation=1):
    """``(N, W*W, h, w)`` window logits with the positions outside the image set to
    ``-out_of_image_penalty`` (the one rule both short-term attentions use)."""
    h, w = logits.shape[-2:]
    invalid = ~window_valid_mask(h, w, max_dis, dilation, logits.device)
    return logits.masked_fill(invalid, -out_of_image_penalty(logits.dtype))


def _tiles(x, tile, halo):
    """``(N, C, h, w)`` -> ``(N * nT, C, (tile + 2*halo)^2)`` overlapping tiles.

    The map is zero-padded by ``halo`` on every side and up to a multiple of ``tile``.
    """
    N, C, h, w = x.shape
    # Padding and tile counts with non-negative operands only: the same integers, and they
    # export to ONNX correctly (its integer Div truncates where Python floors).
    ph, pw = (tile - h % tile) % tile, (tile - w % tile) % tile
    xp = F.pad(x, (halo, halo + pw, halo, halo + ph))
    k = tile + 2 * halo
    cols = F.unfold(xp, kernel_size=k, stride=tile)            # (N, C*k*k, nT)
    nT = cols.shape[-1]
    return cols.view(N, C, k * k, nT).permute(0, 3, 1, 2).reshape(N * nT, C, k * k)


def _untile(x, N, h, w, tile):
    """``(N * nT, t*t, C)`` -> ``(N, C, h, w)`` (inverse of tiling queries)."""
    nTy, nTx = (h + tile - 1) // tile, (w + tile - 1) // tile
    C = x.shape[-1]
    x = x.view(N, nTy, nTx, tile, tile, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, C, nTy * tile, nTx * tile)[:, :, :h, :w]


def local_window_logits(q, k, max_dis=7, dilation=1, tile=DEFAULT_TILE):
    """Dot products of every query with its window of keys.

    Args:
        q, k: ``(N, d, h, w)`` (``N`` = batch x heads).
    Returns:
        ``(N, W*W, h, w)`` with zero-padded (out-of-image) keys giving 0.
    """
    N, d, h, w = q.shape
    R = max_dis * dilation
    qt = _tiles(q, tile, 0)                                   # (N*nT, d, t*t)
    kt = _tiles(k, tile, R)                                   # (N*nT, d, P)
    full = torch.bmm(qt.transpose(1, 2), kt)                  # (N*nT, t*t, P)
    idx = _tile_window_index(tile, max_dis, dilation).to(q.device)
    win = torch.gather(full, 2, idx.unsqueeze(0).expand(full.shape[0], -1, -1))
    return _untile(win, N, h, w, tile)                        # (N, W*W, h, w)


def local_window_aggregate(attn, v, max_dis=7, dilation=1, tile=DEFAULT_TILE):
    """Weighted sum of the windowed values.

    Args:
        attn: ``(N, W*W, h, w)`` weights (out-of-image positions should be ~0).
        v: ``(N, c, h, w)`` values.
    Returns:
        ``(N, c, h, w)``: ``out[y, x] = sum_n attn[n, y, x] * v[y + dy_n, x + dx_n]``.
    """
    N, c, h, w = v.shape
    R = max_dis * dilation
    P = (tile + 2 * R) ** 2
    at = _tiles(attn, tile, 0).transpose(1, 2)                # (N*nT, t*t, W*W)
    idx = _tile_window_index(tile, max_dis, dilation).to(attn.device)
    dense = at.new_zeros(at.shape[0], tile * tile, P)
    dense.scatter_(2, idx.unsqueeze(0).expand(at.shape[0], -1, -1), at)
    vt = _tiles(v, tile, R)                                   # (N*nT, c, P)
    out = torch.bmm(dense, vt.transpose(1, 2))                # (N*nT, t*t, c)
    return _untile(out, N, h, w, tile)


# -- upstream-style dense path (the speed baseline; also checked against the direct sums) -------

def dense_window_logits(q, k, max_dis=7, dilation=1):
    """:func:`local_window_logits` the way upstream's pure-PyTorch fallback computes it: the
    keys are padded and unfolded into every query's full ``W*W`` window at once
    (``(N, d, W*W, h*w)`` in memory). Kept as the baseline of ``tools/benchmark.py
    --vs-upstream-dense``; same results up to float rounding."""
    N, d, h, w = q.shape
    W = 2 * max_dis + 1
    R = max_dis * dilation
    windows = F.unfold(F.pad(k, [R] * 4), W, dilation=dilation).view(N, d, W * W, h * w)
    return (q.reshape(N, d, 1, h * w) * windows).sum(1).view(N, W * W, h, w)


@_cached_constant
def _dense_window_columns(h, w, max_dis, dilation):
    """``(h*w, W*W)`` flat positions of every query's window inside the padded map."""
    R = max_dis * dilation
    pw = w + 2 * R
    qy, qx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    d = torch.arange(-max_dis, max_dis + 1) * dilation
    dy, dx = torch.meshgrid(d, d, indexing='ij')
    return ((qy.reshape(-1, 1) + R + dy.reshape(1, -1)) * pw
            + (qx.reshape(-1, 1) + R + dx.reshape(1, -1)))


def dense_window_aggregate(attn, v, max_dis=7, dilation=1):
    """:func:`local_window_aggregate` the way upstream's fallback does it: the window weights
    are scattered into a dense ``(h*w, (h+2R)(w+2R))`` matrix per head, cropped to the image
    and multiplied with the values (``L x L`` in memory)."""
    N, c, h, w = v.shape
    R = max_dis * dilation
    ph, pw = h + 2 * R, w + 2 * R
    W2 = attn.shape[1]
    cols = _dense_window_columns(h, w, max_dis, dilation).to(attn.device)
    dense = attn.new_zeros(N, h * w, ph * pw)
    dense.scatter_(2, cols.unsqueeze(0).expand(N, -1, -1), attn.view(N, W2, h * w).transpose(1, 2))
    dense = dense.view(N, h * w, ph, pw)[:, :, R:R + h, R:R + w].reshape(N, h * w, h * w)
    return (dense @ v.view(N, c, h * w).transpose(1, 2)).transpose(1, 2).view(N, c, h, w)


LOCAL_IMPLS = {
    'tiled': (local_window_logits, local_window_aggregate),
    'dense': (dense_window_logits, dense_window_aggregate),
}
