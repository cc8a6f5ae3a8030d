"""Swin Transformer backbone (Swin-B for SwinB-AOT/DeAOT-L), first three stages only.

Names follow the detection variant of Swin that upstream aot-benchmark uses (``patch_embed``,
``layers.{i}.blocks.{j}.{norm1,attn,norm2,mlp}``, ``layers.{0,1}.downsample``, per-output norms
``norm0..2``), so ``swin_base_patch4_window7_224_22k.pth`` loads by name once the classification
head, the final norm, stage 3 and the stage-2 downsample are dropped.

Layout: the 4x stage, PatchMerging, the 8x stage, PatchMerging, the 16x stage; each stage output
goes through its LayerNorm and is returned as a map; the 16x map is returned twice. Feature maps of
any size work: the image is padded to a multiple of the patch size, each stage's tokens are padded
(bottom/right, after ``norm1``) to a multiple of the window, and PatchMerging pads odd sizes.
Attention is windowed, with a cyclic shift of ``window // 2`` on every second block; in shifted
blocks, token pairs that were not neighbours before the roll get -100 added to their logit.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.layers.basic import DropPath

# Architecture of the model ids that use Swin (upstream ``build_swin_model``).
SWIN_CONFIGS = {
    'swin_base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      window_size=7, drop_path_rate=0.3),
}


def relative_position_index(window_size):
    """``(W*W, W*W)`` int64 table index of the bias between query token ``q`` and key token ``k``.

    Entry ``[q, k] = (dy + W - 1) * (2W - 1) + (dx + W - 1)`` with ``(dy, dx) = pos(q) - pos(k)``
    and positions row-major inside the window.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                        indexing='ij')).flatten(1)            # (2, W*W)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)          # (2, W*W, W*W)
    return rel[0] * (2 * window_size - 1) + rel[1]


def window_partition(x, window_size):
    """``(B, H, W, C)`` -> ``(B * nH * nW, window*window, C)``, windows in row-major order."""
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows, window_size, H, W):
    """Inverse of :func:`window_partition`: ``(B*nH*nW, window*window, C)`` -> ``(B, H, W, C)``."""
    ws = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shifted_window_mask(Hp, Wp, window_size, shift_size, device=None):
    """``(nW, window*window, window*window)`` additive mask for the shifted windows.

    After the roll by ``-shift``, the bottom/right ``shift`` rows/columns hold tokens from the
    opposite border. Each padded-grid position gets a region id (3 x 3 regions); pairs from
    different regions get -100 (upstream's value, effectively -inf after softmax), others 0.
    """
    ws, s = window_size, shift_size
    bounds_h = torch.tensor([Hp - ws, Hp - s], device=device)
    bounds_w = torch.tensor([Wp - ws, Wp - s], device=device)
    rid_h = torch.bucketize(torch.arange(Hp, device=device), bounds_h, right=True)
    rid_w = torch.bucketize(torch.arange(Wp, device=device), bounds_w, right=True)
    region = (rid_h[:, None] * 3 + rid_w[None, :]).to(torch.float32)           # (Hp, Wp)
    region = window_partition(region[None, :, :, None], ws).squeeze(-1)       # (nW, ws*ws)
    diff = region[:, None, :] - region[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (keys ``fc1``, ``fc2``)."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``window x window`` windows with relative position bias.

    Parameters: ``relative_position_bias_table`` ``((2W-1)^2, heads)``, ``qkv`` (dim -> 3 dim),
    ``proj``; buffer ``relative_position_index`` ``(W^2, W^2)`` (persistent: it is in upstream's
    state dict and checkpoints).

    Shapes: ``x`` ``(B_, N, C)`` with ``N = W*W``; ``mask`` ``(nW, N, N)`` additive or None, where
    ``B_`` is a multiple of ``nW`` with windows of one image contiguous.
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop          # a probability, applied inside the attention kernel
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02, a=-0.04, b=0.04)

    def position_bias(self):
        """``(heads, N, N)`` relative position bias."""
        N = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                           # (B_, heads, N, hd)
        bias = self.position_bias().to(q.dtype)                           # (heads, N, N)
        if mask is not None:
            # Group the windows per image so the (nW, heads, N, N) mask broadcasts over images
            # instead of being materialised once per image.
            nW = mask.shape[0]
            q, k, v = (t.reshape(B_ // nW, nW, *t.shape[1:]) for t in (q, k, v))
            bias = bias[None] + mask.to(q.dtype)[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale)
        out = out.reshape(B_, self.num_heads, N, -1).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self):
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'attn_drop={self.attn_drop}')


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention block followed by a pre-norm MLP.

    Shapes: ``x`` ``(B, H*W, C)`` -> ``(B, H*W, C)``; ``attn_mask`` is the layer's
    :func:`shifted_window_mask` (used only when ``shift_size > 0``).
    """

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True,
                 drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size must be in [0, window_size), got {shift_size}')
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path, batch_dim=0) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, H, W, attn_mask=None):
        B, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        # Pad after the norm so padded tokens are exact zeros (they still act as keys, as upstream).
        pad_b, pad_r = (-H) % ws, (-W) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), mask=attn_mask if s > 0 else None)
        x = window_reverse(windows, ws, Hp, Wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = x[:, :H, :W].reshape(B, L, C)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (4C) -> LayerNorm -> Linear(4C, 2C, no bias).

    Concatenation order is (0,0), (1,0), (0,1), (1,1) in (row, col) offsets, as upstream.
    Shapes: ``(B, H*W, C)`` -> ``(B, ceil(H/2)*ceil(W/2), 2C)``.
    """

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H, W):
        B, L, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating plain/shifted windows, optional PatchMerging.

    ``forward(x, H, W)`` returns ``(stage_out, H, W, next_in, H', W')`` with ``next_in`` the merged
    tokens (or ``stage_out`` when there is no downsample).
    """

    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, qkv_bias=True,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, downsample=False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        drop_path = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                                 drop, attn_drop, drop_path[i])
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, H, W):
        ws = self.window_size
        mask = shifted_window_mask(math.ceil(H / ws) * ws, math.ceil(W / ws) * ws, ws,
                                   self.shift_size, x.device)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        if self.downsample is None:
            return x, H, W, x, H, W
        return x, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv embedding (+ LayerNorm); pads H, W up to a multiple.

    Shapes: ``(B, 3, H, W)`` -> ``(B, C, ceil(H/p), ceil(W/p))``.
    """

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, patch_norm=True):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        p = self.patch_size
        H, W = x.shape[-2:]
        x = self.proj(F.pad(x, (0, (-W) % p, 0, (-H) % p)))
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinTransformer(nn.Module):
    """Swin backbone returning ``[x4, x8, x16, x16]`` (stage 3 of ``depths`` is not built).

    Args:
        embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias: architecture. ``depths``
            and ``num_heads`` list all four stages of the ImageNet model; only the first
            ``num_stages`` are built.
        drop_rate, attn_drop_rate: dropout in MLP/projection and on attention weights.
        drop_path_rate: stochastic depth, linear from 0 to this value over **all** blocks of
            ``depths`` (24 for Swin-B, including the unbuilt stage), as upstream.
        num_stages: stages built (3; each but the last ends with PatchMerging).
        frozen_stages: see :meth:`freeze`.

    Shapes: ``(B, 3, H, W)`` -> ``(B, C, ceil(H/4), ceil(W/4))``, ``(B, 2C, ./8)``,
    ``(B, 4C, ./16)`` twice, with ``C = embed_dim`` and ``ceil`` applied at each halving.
    """

    def __init__(self, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 window_size=7, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.3, patch_size=4, in_chans=3, patch_norm=True, num_stages=3,
                 frozen_stages=-1):
        super().__init__()
        self.num_layers = num_stages
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                embed_dim * 2 ** i, depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                drop_rate, attn_drop_rate, dpr[start:start + depths[i]],
                downsample=i < num_stages - 1))
        self.num_features = [embed_dim * 2 ** i for i in range(num_stages)]
        self.out_channels = self.num_features + self.num_features[-1:]
        for i in range(num_stages):
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self.freeze(frozen_stages)

    def freeze(self, frozen_stages):
        """Freeze the patch embedding and the first ``frozen_stages - 1`` stages.

        - ``frozen_stages >= 0``: ``patch_embed`` gets ``requires_grad = False`` (Swin's
          convention: 0 already freezes the stem).
        - ``frozen_stages >= 2``: stages ``0 .. frozen_stages - 2`` (at most all built stages) get
          ``requires_grad = False`` and their stochastic depth and attention/projection dropout are
          switched off, so a frozen stage is a fixed function in training too.
        - The PatchMerging that *leaves* the last frozen stage feeds the first trainable stage and
          stays trainable, like the stride-2 entry of a trainable ResNet stage; PatchMergings
          between two frozen stages are frozen. With ``frozen_stages = 2`` (the configs' value):
          ``patch_embed`` and ``layers.0.blocks`` are frozen, ``layers.0.downsample`` is trainable.

        Upstream bug (spec section 8.9): upstream re-enables the downsample of the loop variable
        left over after its loop, which only yields this rule because the leaked variable happens
        to be the last frozen stage, and it indexes past the built stages (IndexError) for
        ``frozen_stages >= 5``. Here the rule is explicit and the count is clamped to the built
        stages; for ``frozen_stages <= 4`` the result is the same as upstream's. The per-output
        norms ``norm0..2`` are never frozen (as upstream).
        """
        if frozen_stages >= 0:
            for p in self.patch_embed.parameters():
                p.requires_grad_(False)
        num_frozen = min(max(frozen_stages - 1, 0), self.num_layers)
        if num_frozen == 0:
            return
        self.pos_drop = nn.Identity()
        for layer in self.layers[:num_frozen]:
            for blk in layer.blocks:
                blk.drop_path = nn.Identity()
                blk.attn.attn_drop = 0.0
                blk.attn.proj_drop = nn.Identity()
            for p in layer.parameters():
                p.requires_grad_(False)
        last = self.layers[num_frozen - 1]
        if last.downsample is not None:
            for p in last.downsample.parameters():
                p.requires_grad_(True)

    def forward(self, x):
        """``x``: ``(B, 3, H, W)`` -> ``[x4, x8, x16, x16]``."""
        x = self.patch_embed(x)
        H, W = x.shape[-2:]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, h, w, x, H, W = layer(x, H, W)
            x_out = getattr(self, f'norm{i}')(x_out)
            outs.append(x_out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        outs.append(outs[-1])
        return outs


def build_swin(name='swin_base', freeze_at=-1, **overrides):
    """Swin backbone ``name`` (see ``SWIN_CONFIGS``) with ``frozen_stages = freeze_at``."""
    if name not in SWIN_CONFIGS:
        raise ValueError(f'unknown Swin variant {name!r}; known: {sorted(SWIN_CONFIGS)}')
    cfg = dict(SWIN_CONFIGS[name], **overrides)
    return SwinTransformer(frozen_stages=freeze_at, **cfg)
