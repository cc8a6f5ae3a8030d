"""Gated Deformable Attention (GDA): DeAOT's long-term gated attention over deformed memory keys.

Drop-in replacement for the long-term ``GatedPropagation`` of a DeAOT propagation module
(docs/gda.md). Instead of attending to every token of every long-term memory frame, each
query attends to ``T * H_g * W_g`` keys bilinearly re-sampled from the memory maps at
positions = reference grid of stride ``g`` + offsets predicted from the current query (DAT,
Xia et al.). The gate, the depthwise 5x5 conv and the output projection are those of the vanilla
module, with the same parameter names, so a vanilla DeAOT checkpoint loads with only
``conv_offset.*`` new.

Sampling geometry (all coordinates in ``grid_sample``'s normalised ``[-1, 1]`` frame with
``align_corners=False``, where ``-1`` / ``+1`` are the outer edges of the first / last pixel):

* Key grid: ``H_g = ceil(h / g)``, ``W_g = ceil(w / g)`` -- the output size of the offset
  network's strided conv (odd kernel, padding ``k // 2``).
* Reference of key cell ``(i, j)``: ``x = 2 (j + 0.5) / W_g - 1``, ``y = 2 (i + 0.5) / H_g - 1``,
  i.e. the centres of ``W_g x H_g`` equal cells tiling the map's extent. In pixel units that is
  column ``(j + 0.5) * w / W_g - 0.5`` (same for rows). When ``g`` divides ``w`` this is exactly
  the centre of the ``g x g`` pixel block ``j`` (``g * j + (g - 1) / 2``), so zero offsets at
  ``g = 2`` give 2x2 average pooling and at ``g = 1`` give the map itself. When ``g`` does not
  divide ``w`` the cells are ``w / W_g < g`` pixels wide: the references still span the whole map
  evenly (first and last cell touch the borders) rather than leaving a ragged last block.
* Offsets: raw ``o = (o_x, o_y)`` (channel 0 is x / width, channel 1 is y / height) become
  ``delta_x = s * tanh(o_x) / W_g`` (same for y with ``H_g``). One key cell is ``2 / W_g`` wide,
  so a shift is at most ``s / 2`` key cells = ``s * g / 2`` pixels (``s = 2``: one key cell).
  ``offset_scale <= 0`` selects the unbounded DAT++ variant: ``delta_x = 2 * o_x / W_g``
  (``o`` in key-cell units), no tanh.
* Position ``p = clamp(ref + delta, -1, 1)``, sampled bilinearly with border padding.

Offset groups: the ``d_att * num_head`` query channels are split into ``S`` consecutive groups;
one offset network (weights shared across groups, as in DAT) gives each group its own positions.
Group ``s`` samples channel slice ``s`` of K (``C_k / S`` channels), of the visual V and of the
ID V (``C_v / 2 / S`` each) at the same positions, for every memory frame alike. The sampled
tensors keep the original channel order, so head splitting is unchanged from vanilla.

Attention capture (for distillation): set ``module.capture = {}`` and the next forward stores
``capture['attn']`` = the softmax map ``(B, num_head, L, N_keys)`` and ``capture['id_out']`` = the
ID half of the **gated** attention output ``(attn @ V) * U`` before the DWConv/projection,
``(B, L, C_v / 2)`` (docs/distillation.md, ``KD_ATT_TENSOR``); the forward then also returns ``attn``. Tensors keep
their autograd graph (the student's CKA loss back-propagates through them). With
``capture = None`` (the default) nothing is kept and ``attn`` is returned as ``None``.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.layers.basic import DWConv2d

__all__ = ['GatedDeformableAttention', 'LayerNorm2d', 'reference_points']


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (keys ``weight``/``bias`` as LayerNorm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def reference_points(H_g, W_g, dtype=torch.float32, device=None):
    """Key-cell centres in normalised ``align_corners=False`` coordinates.

    Returns ``(H_g, W_g, 2)`` holding ``(x, y)`` with ``x = 2 (j + 0.5) / W_g - 1`` and
    ``y = 2 (i + 0.5) / H_g - 1``.
    """
    ys = (torch.arange(H_g, dtype=dtype, device=device) + 0.5) * (2.0 / H_g) - 1.0
    xs = (torch.arange(W_g, dtype=dtype, device=device) + 0.5) * (2.0 / W_g) - 1.0
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack((grid_x, grid_y), dim=-1)


class GatedDeformableAttention(nn.Module):
    """DeAOT long-term gated attention over deformably re-sampled memory keys and values.

    Args:
        d_qk: model width on the query side (256 in DeAOT); sets ``d_att = d_qk / num_head``
            when ``d_att`` is not given.
        d_vu: output width (512 = visual 256 + ID 256); values and gate are
            ``E = d_vu * expand_ratio`` wide (1024 = visual V 512 + ID V 512).
        num_head: attention heads (1 in DeAOT).
        dropout: dropout on the attention weights (0 in DeAOT).
        d_att: per-head query/key width (128 in DeAOT).
        expand_ratio: value expansion, see ``d_vu``.
        grid: g, stride of the reference grid (keys per frame shrink by about g^2).
        groups: S, offset groups over the ``d_att * num_head`` query channels.
        kernel: odd kernel of the offset network's depthwise conv.
        offset_scale: s; offsets bounded to ``s / 2`` key cells. ``<= 0``: unbounded, clamped.
        no_offset: ablation; no offset network, sample at the reference points only.
    """

    def __init__(self, d_qk=256, d_vu=512, num_head=1, dropout=0.0, d_att=128, expand_ratio=2,
                 grid=2, groups=2, kernel=5, offset_scale=2.0, no_offset=False):
        super().__init__()
        self.num_head = num_head
        self.d_att = d_qk // num_head if d_att is None else d_att
        self.d_middle = self.d_att * num_head
        self.expand_d = int(d_vu * expand_ratio)
        self.hidden_dim = self.expand_d // num_head
        self.grid = int(grid)
        self.groups = int(groups)
        self.kernel = int(kernel)
        self.offset_scale = float(offset_scale)
        self.no_offset = bool(no_offset)

        if self.grid < 1:
            raise ValueError(f'GatedDeformableAttention: grid must be >= 1, got {grid}')
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f'GatedDeformableAttention: kernel must be odd (key grid = ceil(h / g)), '
                             f'got {kernel}')
        if self.expand_d % num_head or self.expand_d % 2:
            raise ValueError(f'GatedDeformableAttention: value width {self.expand_d} must split into '
                             f'2 branches and {num_head} heads')
        if self.groups < 1 or self.d_middle % self.groups or (self.expand_d // 2) % self.groups:
            raise ValueError(f'GatedDeformableAttention: groups={groups} must divide the key width '
                             f'{self.d_middle} and the per-branch value width {self.expand_d // 2}')

        self.group_k = self.d_middle // self.groups           # key channels per group
        self.group_v = self.expand_d // 2 // self.groups      # visual (and ID) value channels per group

        if not self.no_offset:
            c = self.group_k
            self.conv_offset = nn.Sequential(
                nn.Conv2d(c, c, self.kernel, stride=self.grid, padding=self.kernel // 2, groups=c),
                LayerNorm2d(c),
                nn.GELU(),
                # No bias: a bias would shift every sampling point of every map alike (DAT).
                nn.Conv2d(c, 2, 1, bias=False),
            )
            self.reset_offset_parameters()

        self.dropout = nn.Dropout(dropout)
        self.dw_conv = DWConv2d(self.expand_d)
        self.projection = nn.Linear(self.expand_d, d_vu)

        # Distillation tap; see the module docstring for the contract.
        self.capture: Optional[dict] = None
        self.global_impl = 'sdpa'  # or 'explicit': networks/layers/attention_impl.py

    def reset_offset_parameters(self):
        """Zero the offset network's last conv, so the module starts as plain grid sampling.

        Call again after any blanket re-initialisation of the enclosing block (DeAOT's GPM applies
        xavier_uniform to every parameter with ``dim > 1``).
        """
        if not self.no_offset:
            nn.init.zeros_(self.conv_offset[-1].weight)

    def key_grid_size(self, size_2d):
        """``(H_g, W_g)`` for a ``(h, w)`` map: ``ceil(h / g), ceil(w / g)``."""
        h, w = size_2d
        return (h - 1) // self.grid + 1, (w - 1) // self.grid + 1

    def sampling_positions(self, Q, size_2d):
        """Normalised sampling positions from the current query.

        Args:
            Q: ``(L, B, d_middle)`` query tokens, row-major over ``size_2d``.
        Returns:
            ``(B, S, H_g, W_g, 2)`` positions ``(x, y)`` in ``[-1, 1]``, in at least float32.
        """
        h, w = size_2d
        L, B, C = Q.shape
        H_g, W_g = self.key_grid_size(size_2d)
        dtype = torch.promote_types(Q.dtype, torch.float32)
        ref = reference_points(H_g, W_g, dtype=dtype, device=Q.device)
        if self.no_offset:
            return ref.expand(B, self.groups, H_g, W_g, 2)

        q = Q.permute(1, 2, 0).reshape(B * self.groups, self.group_k, h, w)
        raw = self.conv_offset(q).to(dtype)                            # (B*S, 2, H_g, W_g)
        raw = raw.permute(0, 2, 3, 1).reshape(B, self.groups, H_g, W_g, 2)
        cells = torch.tensor([W_g, H_g], dtype=dtype, device=Q.device)
        if self.offset_scale > 0:
            delta = torch.tanh(raw) * (self.offset_scale / cells)
        else:
            delta = raw * (2.0 / cells)
        return (ref + delta).clamp(-1.0, 1.0)

    def prepare_memory(self, K, V, size_2d):
        """The memory in the layout :meth:`sample_prepared` reads; depends on the memory only.

        Args:
            K: ``(T*L, B, d_middle)`` memory keys, frame-major, each frame row-major over ``size_2d``.
            V: ``(T*L, B, E)`` memory values ``[visual (E/2) | ID (E/2)]``.
        Returns:
            ``(B*T*S, ck + 2 cv, h, w)`` in channels-last memory order: per (sample, frame,
            group) the group's key, visual-value and ID-value channels side by side. The
            positions change every frame, this layout does not: the propagation layers cache
            it with the memory (:meth:`MemoryEntry.derived`), so a long-term frame is rearranged
            once per write instead of once per frame. Channels-last also makes ``grid_sample``
            ~3x faster on CPU (each bilinear tap reads one contiguous run of channels).
        """
        h, w = size_2d
        L = h * w
        B = K.shape[1]
        T = K.shape[0] // L
        S, ck, cv = self.groups, self.group_k, self.group_v
        k = K.view(T, h, w, B, S, ck)
        v = V.view(T, h, w, B, 2, S, cv)
        mem = torch.cat((k, v[:, :, :, :, 0], v[:, :, :, :, 1]), dim=-1)   # (T, h, w, B, S, C)
        mem = mem.permute(3, 0, 4, 1, 2, 5).reshape(B * T * S, h, w, ck + 2 * cv)
        return mem.permute(0, 3, 1, 2)                                  # (B*T*S, C, h, w) view

    def sample_prepared(self, mem, pos):
        """Re-sample every memory frame's K, visual V and ID V at the groups' positions.

        Args:
            mem: from :meth:`prepare_memory`.
            pos: ``(B, S, H_g, W_g, 2)`` from :meth:`sampling_positions`.
        Returns:
            ``K_s (B, d_middle, T*N)`` and ``V_s (B, E, T*N)`` with ``N = H_g * W_g``; keys are
            frame-major then row-major over the key grid; channels keep their original order.
        """
        S, ck, cv = self.groups, self.group_k, self.group_v
        B, _, H_g, W_g, _ = pos.shape
        T = mem.shape[0] // (B * S)
        N = H_g * W_g
        # One grid_sample for everything: groups and frames in the batch.
        grid = pos.unsqueeze(1).expand(B, T, S, H_g, W_g, 2).reshape(B * T * S, H_g, W_g, 2)
        out = F.grid_sample(mem, grid.to(mem.dtype), mode='bilinear', padding_mode='border',
                            align_corners=False)
        out = out.reshape(B, T, S, ck + 2 * cv, N)
        k_s, vis_s, id_s = out.split((ck, cv, cv), dim=3)

        def regroup(x, c):  # (B, T, S, c, N) -> (B, S*c, T*N): channel s*c + i, key t*N + n
            return x.permute(0, 2, 3, 1, 4).reshape(B, S * c, T * N)

        K_s = regroup(k_s, ck)
        V_s = torch.cat((regroup(vis_s, cv), regroup(id_s, cv)), dim=1)
        return K_s, V_s

    def sample_memory(self, K, V, pos, size_2d):
        """:meth:`sample_prepared` of :meth:`prepare_memory` (shapes there)."""
        return self.sample_prepared(self.prepare_memory(K, V, size_2d), pos)

    def forward(self, Q, K, V, U, size_2d):
        """Gated attention of the current frame over deformed long-term memory.

        Args:
            Q: ``(L, B, d_middle)`` current-frame queries, ``L = h * w`` row-major over ``size_2d``.
            K: ``(T*L, B, d_middle)`` memory keys of ``T`` frames (frame-major, same ``(h, w)``).
            V: ``(T*L, B, E)`` memory values ``[visual | ID]``.
            U: ``(L, B, E)`` gate, already activated.
            size_2d: ``(h, w)``.
        Returns:
            ``out (L, B, d_vu)`` and ``attn (B, num_head, L, T*H_g*W_g)`` when ``self.capture`` is
            a dict, else ``None``.
        """
        h, w = size_2d
        L = Q.shape[0]
        if L != h * w or K.shape[0] % L or V.shape[0] != K.shape[0] or U.shape[0] != L:
            raise ValueError(
                f'GatedDeformableAttention: expected Q/U with h*w={h * w} tokens and K/V with a '
                f'multiple of it, got Q {tuple(Q.shape)}, K {tuple(K.shape)}, V {tuple(V.shape)}, '
                f'U {tuple(U.shape)}')
        return self.attend(Q, self.prepare_memory(K, V, size_2d), U, size_2d)

    def attend(self, Q, mem, U, size_2d):
        """:meth:`forward` over memory already in :meth:`prepare_memory`'s layout."""
        L, B, _ = Q.shape
        pos = self.sampling_positions(Q, size_2d)
        K_s, V_s = self.sample_prepared(mem, pos)
        n_keys = K_s.shape[-1]

        q = Q.view(L, B, self.num_head, self.d_att).permute(1, 2, 0, 3)   # (B, heads, L, d)
        k = K_s.view(B, self.num_head, self.d_att, n_keys).transpose(-1, -2)
        v = V_s.view(B, self.num_head, self.hidden_dim, n_keys).transpose(-1, -2)
        attn = None
        if (self.capture is not None or (self.training and self.dropout.p > 0)
                or self.global_impl == 'explicit'):
            logits = (q / math.sqrt(self.d_att)) @ k.transpose(-1, -2)
            attn = torch.softmax(logits, dim=-1)                           # (B, heads, L, N)
            out = self.dropout(attn) @ v                                   # (B, heads, L, hidden)
        else:
            # Same sums without the (L, N_keys) map (fused kernels where available).
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.d_att))
        out = out.permute(2, 0, 1, 3).reshape(L, B, self.expand_d) * U

        if self.capture is not None:
            self.capture['attn'] = attn
            self.capture['id_out'] = out[..., self.expand_d // 2:].transpose(0, 1)

        out = self.projection(self.dw_conv(out, size_2d))
        return out, attn

    def extra_repr(self):
        return (f'heads={self.num_head}, d_att={self.d_att}, value={self.expand_d}, grid={self.grid}, '
                f'groups={self.groups}, kernel={self.kernel}, offset_scale={self.offset_scale}, '
                f'no_offset={self.no_offset}')
