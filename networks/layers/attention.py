"""DeAOT's gated attention: global (long-term / self) and local (short-term) propagation.

Tokens are sequence-first ``(L, B, C)``; 2D maps are ``(B, C, h, w)``.

Gated attention (Yang & Yang, DeAOT): ``out = proj(dwconv((softmax(QK^T / sqrt(d)) V) * U))``.
The gate multiplies *after* aggregation, so the aggregation is a plain softmax attention
and ``F.scaled_dot_product_attention`` computes it exactly (flash / memory-efficient
kernels where available). The explicit path is used only when the attention map itself is
wanted (capture for distillation) or attention dropout is active.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basic import DWConv2d
from .local_window import LOCAL_IMPLS, mask_out_of_image


def _interleave_heads(x1, x2, num_head):
    """Concatenate two ``(L, B, C/2)`` halves per head -> ``(L, B, C)``.

    With several heads, every head takes ``C/(2H)`` channels from each half (upstream's
    layout, which trained checkpoints depend on).
    """
    if num_head == 1:
        return torch.cat([x1, x2], dim=-1)
    L, B, half = x1.shape
    x = torch.stack([x1.view(L, B, num_head, half // num_head),
                     x2.view(L, B, num_head, half // num_head)], dim=3)
    return x.reshape(L, B, 2 * half)


def _set_head_sizes(module, d_qk, d_vu, num_head, d_att, expand_ratio):
    """The per-head sizes both gated attentions derive from their arguments."""
    module.expand_d_vu = int(d_vu * expand_ratio)
    module.d_vu = d_vu
    module.num_head = num_head
    module.hidden_dim = module.expand_d_vu // num_head
    module.d_att = d_qk // num_head if d_att is None else d_att
    module.scale = 1.0 / math.sqrt(module.d_att)


class GatedPropagation(nn.Module):
    """Global gated attention (DeAOT ``GatedPropagation``).

    Used twice per GPM layer: as long-term memory attention (``use_linear=False``: Q, K,
    V, U arrive projected) and as joint self-propagation (``use_linear=True``: Q = K =
    ``linear_QK(x)``, V and U from two half-width linears each).

    Args:
        d_qk: width of the incoming Q (``use_linear``) or of the projected Q/K.
        d_vu: width of the incoming V/U and of the output.
        num_head: attention heads.
        d_att: per-head Q/K width (default ``d_qk // num_head``).
        expand_ratio: value width ``E = d_vu * expand_ratio``.
    """

    def __init__(self, d_qk, d_vu, num_head=8, dropout=0.0, use_linear=True, d_att=None,
                 expand_ratio=2.0):
        super().__init__()
        _set_head_sizes(self, d_qk, d_vu, num_head, d_att, expand_ratio)
        self.use_linear = use_linear
        if use_linear:
            half = self.hidden_dim * num_head // 2
            self.linear_QK = nn.Linear(d_qk, self.d_att * num_head)
            self.linear_V1 = nn.Linear(d_vu // 2, half)
            self.linear_V2 = nn.Linear(d_vu // 2, half)
            self.linear_U1 = nn.Linear(d_vu // 2, half)
            self.linear_U2 = nn.Linear(d_vu // 2, half)
        self.dropout = nn.Dropout(dropout)
        self.dw_conv = DWConv2d(self.expand_d_vu)
        self.projection = nn.Linear(self.expand_d_vu, d_vu)
        # 'sdpa' (fused) or 'explicit' (softmax map then matmul, as upstream).
        self.global_impl = 'sdpa'
        # Set to a dict to receive {'attn': (B, H, L, N), 'id_out': (B, L, E/2)} (gated).
        self.capture: Optional[dict] = None
        self._init_weight()

    def _init_weight(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _project(self, Q, V, U):
        Q = self.linear_QK(Q)
        V1, V2 = torch.split(V, self.d_vu // 2, dim=-1)
        U1, U2 = torch.split(U, self.d_vu // 2, dim=-1)
        V = F.silu(_interleave_heads(self.linear_V1(V1), self.linear_V2(V2), self.num_head))
        U = F.silu(_interleave_heads(self.linear_U1(U1), self.linear_U2(U2), self.num_head))
        return Q, Q, V, U

    def prepare_memory(self, K, V, size_2d):
        """Long-term memory in the form :meth:`attend` reads: ``(K, V)`` as they are (the
        deformable attention has a layout of its own; the layers call both alike)."""
        return K, V

    def attend(self, Q, mem, U, size_2d):
        """:meth:`forward` over :meth:`prepare_memory`'s output."""
        K, V = mem
        return self.forward(Q, K, V, U, size_2d)

    def forward(self, Q, K, V, U, size_2d):
        """
        Args:
            Q: ``(L, B, ·)`` queries; K: ``(N, B, ·)`` keys (ignored when ``use_linear``:
               self-propagation uses ``K = Q``); V: ``(N, B, ·)``; U: ``(L, B, ·)`` gate.
            size_2d: ``(h, w)`` of the query grid (``L = h * w``).
        Returns:
            ``(L, B, d_vu)`` and the attention map ``(B, H, L, N)`` when captured, else None.
        """
        if self.use_linear:
            Q, K, V, U = self._project(Q, V, U)
        L, B, _ = Q.shape
        H = self.num_head
        q = Q.view(L, B, H, self.d_att).permute(1, 2, 0, 3)          # (B, H, L, d)
        k = K.view(-1, B, H, self.d_att).permute(1, 2, 0, 3)         # (B, H, N, d)
        v = V.view(-1, B, H, self.hidden_dim).permute(1, 2, 0, 3)    # (B, H, N, c)
        attn = None
        if (self.capture is not None or (self.training and self.dropout.p > 0)
                or self.global_impl == 'explicit'):
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
            out = self.dropout(attn) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.permute(2, 0, 1, 3).reshape(L, B, self.expand_d_vu) * U  # (L, B, E)
        if self.capture is not None:
            # Same contract as GatedDeformableAttention: the ID half of the gated output.
            self.capture['attn'] = attn
            self.capture['id_out'] = out[..., self.expand_d_vu // 2:].transpose(0, 1)
        out = self.dw_conv(out, size_2d)
        return self.projection(out), attn


class LocalGatedPropagation(nn.Module):
    """Short-term gated attention over a ``(2*max_dis+1)^2`` window (DeAOT).

    ``q``, ``k``, ``v`` are 2D maps; the logits get a learnt relative-position term
    ``relative_emb_k(q)`` (computed from the unscaled query, as upstream) and window
    positions outside the image are masked. As used in DeAOT (``use_linear=False``) the
    module has only ``relative_emb_k``, ``dw_conv`` and ``projection``.
    """

    def __init__(self, d_qk, d_vu, num_head, dropout=0.0, max_dis=7, dilation=1,
                 use_linear=True, d_att=None, expand_ratio=2.0):
        super().__init__()
        _set_head_sizes(self, d_qk, d_vu, num_head, d_att, expand_ratio)
        self.max_dis = max_dis
        self.dilation = dilation
        self.window_size = 2 * max_dis + 1
        self.use_linear = use_linear
        d_middle = self.d_att * num_head
        if use_linear:
            self.linear_QK = nn.Conv2d(d_qk, d_middle, kernel_size=1)
            self.linear_V = nn.Conv2d(d_vu, self.expand_d_vu, kernel_size=1, groups=2)
            self.linear_U = nn.Conv2d(d_vu, self.expand_d_vu, kernel_size=1, groups=2)
        self.relative_emb_k = nn.Conv2d(d_middle, num_head * self.window_size ** 2,
                                        kernel_size=1, groups=num_head)
        self.dropout = nn.Dropout(dropout)
        # 'tiled' (ours) or 'dense' (upstream's fallback, the benchmark's baseline):
        # networks/layers/attention_impl.py switches it for a whole model.
        self.local_impl = 'tiled'
        self.dw_conv = DWConv2d(self.expand_d_vu)
        self.projection = nn.Linear(self.expand_d_vu, d_vu)

    def forward(self, q, k, v, u, size_2d):
        """
        Args:
            q, k: ``(B, d_att*H, h, w)``; v: ``(B, E, h, w)``; u: ``(L, B, E)`` gate.
        Returns:
            ``(L, B, d_vu)`` and the window attention ``(B, H, W*W, L)``.
        """
        B, _, h, w = v.shape
        H = self.num_head
        if self.use_linear:
            q = k = self.linear_QK(q)
            v = F.silu(self.linear_V(v))
            u = F.silu(self.linear_U(u))
            if H > 1:
                v = v.view(B, 2, H, self.hidden_dim // 2, h, w).transpose(1, 2).reshape(B, -1, h, w)
                u = u.view(B, 2, H, self.hidden_dim // 2, h * w).permute(4, 0, 2, 1, 3).reshape(h * w, B, -1)
            else:
                u = u.flatten(2).permute(2, 0, 1)
        W2 = self.window_size ** 2
        rel = self.relative_emb_k(q).view(B * H, W2, h, w)
        window_logits, window_aggregate = LOCAL_IMPLS[self.local_impl]
        logits = window_logits((q * self.scale).reshape(B * H, self.d_att, h, w),
                                     k.reshape(B * H, self.d_att, h, w),
                                     self.max_dis, self.dilation)
        logits = mask_out_of_image(logits + rel, self.max_dis, self.dilation)
        attn = self.dropout(torch.softmax(logits, dim=1))           # (B*H, W2, h, w)
        out = window_aggregate(attn, v.reshape(B * H, self.hidden_dim, h, w),
                                     self.max_dis, self.dilation)   # (B*H, c, h, w)
        out = out.reshape(B, self.expand_d_vu, h * w).permute(2, 0, 1)
        out = self.dw_conv(out * u, size_2d)
        return self.projection(out), attn.view(B, H, W2, h * w)
