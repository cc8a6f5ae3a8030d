"""DeAOT's propagation stack: ``GatedPropagationModule`` (one GPM layer) and
``DualBranchGPM`` (the stack, attribute ``LSTT`` of the DeAOT model).

Each layer carries two token streams, visual ``tgt`` and identity ``tgt_id`` (both
``(L, B, d)``), and attends to
* long-term memory: stored frames concatenated along tokens (global gated attention, or
  Gated Deformable Attention when ``lt_attention='deformable'``),
* short-term memory: the previous frame (15x15 local gated attention),
then runs a joint gated self-propagation over ``[tgt | tgt_id]``.

Memory handling is explicit: a layer returns this frame's :class:`MemoryEntry`
(``curr``: K, V and the normalised ID state needed to write memory later) and, for a
reference pass (``curr_id_emb`` given), the entry to store (``ref``).
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import GatedPropagation, LocalGatedPropagation
from .basic import DropPath, GroupNorm1D, layer_drop_path_rate, seq_to_2d
from .memory_entry import MemoryEntry


def build_long_term_attention(kind, d_qk, d_vu, num_head, dropout, d_att, gda=None):
    """Long-term attention of a GPM layer: ``'vanilla'`` or ``'deformable'`` (GDA)."""
    if kind == 'vanilla':
        return GatedPropagation(d_qk, d_vu, num_head, dropout=dropout, use_linear=False,
                                d_att=d_att)
    if kind == 'deformable':
        from .deformable import GatedDeformableAttention
        return GatedDeformableAttention(d_qk, d_vu, num_head, dropout=dropout, d_att=d_att,
                                        **(gda or {}))
    raise ValueError(f"MODEL_LT_ATTENTION must be 'vanilla' or 'deformable', got {kind!r}")


class GatedPropagationModule(nn.Module):
    """One DeAOT GPM layer (d = 256, expanded value width E = 2d = 512 per branch)."""

    def __init__(self, d_model=256, self_nhead=1, att_nhead=1, droppath=0.1, lt_dropout=0.0,
                 st_dropout=0.0, droppath_lst=False, max_local_dis=7, local_dilation=1,
                 layer_idx=0, expand_ratio=2.0, lt_attention='vanilla', gda=None):
        super().__init__()
        d = d_model
        E = int(d * expand_ratio)
        self.d_model = d
        self.expand_d_model = E
        self.att_nhead = att_nhead
        self.d_att = d // 2 if att_nhead == 1 else d // att_nhead
        self.layer_idx = layer_idx

        self.norm1 = nn.LayerNorm(d)
        self.linear_QV = nn.Linear(d, self.d_att * att_nhead + E)
        self.linear_U = nn.Linear(d, E)
        if layer_idx == 0:
            self.linear_ID_V = nn.Linear(d, E)
        else:
            self.id_norm1 = nn.LayerNorm(d)
            self.linear_ID_V = nn.Linear(2 * d, E)
            self.linear_ID_U = nn.Linear(d, E)

        self.long_term_attn = build_long_term_attention(
            lt_attention, d, E, att_nhead, lt_dropout, self.d_att, gda)
        self.short_term_attn = LocalGatedPropagation(
            d, E, att_nhead, dropout=st_dropout, max_dis=max_local_dis,
            dilation=local_dilation, use_linear=False, d_att=self.d_att)
        self.lst_dropout = nn.Dropout(max(lt_dropout, st_dropout))
        self.droppath_lst = droppath_lst

        self.norm2 = nn.LayerNorm(d)
        self.id_norm2 = nn.LayerNorm(d)
        self.self_attn = GatedPropagation(2 * d, 2 * d, self_nhead, d_att=self.d_att)
        self.droppath = DropPath(droppath, batch_dim=1)
        self._init_weight()

    def _init_weight(self):
        for name, p in self.named_parameters():
            # GDA's offset network keeps its own init (its last conv starts at zero).
            if p.dim() > 1 and 'conv_offset' not in name:
                nn.init.xavier_uniform_(p)

    def fuse_key_value_id(self, curr: MemoryEntry, id_emb):
        """Memory entry of a frame whose mask is known: K, V unchanged, ID value from the
        frame's ID embedding ``id_emb`` (L, B, d) (and its normalised ID state for layers
        after the first)."""
        if curr.id_value is None:
            id_v = F.silu(self.linear_ID_V(id_emb))
        else:
            id_v = F.silu(self.linear_ID_V(torch.cat([curr.id_value, id_emb], dim=2)))
        return MemoryEntry(curr.key, curr.value, id_v)

    def _prepare_long_term(self, entry: MemoryEntry, size_2d):
        values = torch.cat([entry.value, entry.id_value], dim=-1)      # (N, B, E) [visual | ID]
        return self.long_term_attn.prepare_memory(entry.key, values, size_2d)

    def forward(self, tgt, tgt_id=None, long_term_memory: Optional[MemoryEntry] = None,
                short_term_memory: Optional[MemoryEntry] = None, curr_id_emb=None,
                self_pos=None, size_2d=(30, 30)):
        """
        Args:
            tgt: ``(L, B, d)`` visual tokens; tgt_id: ``(L, B, d)`` ID tokens or None
                (first layer).
            long_term_memory: concatenated stored frames, seq-first (``(N, B, ·)``);
            short_term_memory: previous frame, 2D maps. Both ignored when
                ``curr_id_emb`` (``(L, B, d)``) is given: a reference pass attends to the
                frame itself.
            self_pos: accepted for interface parity with AOT; DeAOT ignores it.
        Returns:
            ``tgt, tgt_id, curr, ref`` (``ref`` is None unless ``curr_id_emb`` is given).
        """
        x = self.norm1(tgt)
        q, v_raw = torch.split(self.linear_QV(x), [self.d_att * self.att_nhead,
                                                   self.expand_d_model], dim=2)
        k = q
        v = F.silu(v_raw)
        u = self.linear_U(x)
        if tgt_id is None:
            tgt_id = 0
            gate = torch.cat([F.silu(u), torch.ones_like(u)], dim=-1)
            id_state = None
        else:
            id_state = self.id_norm1(tgt_id)
            gate = F.silu(torch.cat([u, self.linear_ID_U(id_state)], dim=-1))
        curr = MemoryEntry(k, v, id_state)

        ref = None
        if curr_id_emb is not None:
            ref = self.fuse_key_value_id(curr, curr_id_emb)
            long_term_memory = ref
            short_term_memory = ref.map(lambda t: seq_to_2d(t, size_2d))

        # The long-term memory changes only when a frame is written; its attention-ready form
        # ([visual | ID] values side by side, GDA's sampling layout) is built once per write
        # and kept with the engine's concatenated entry.
        lt_mem = long_term_memory.derived(f'long_term_attn{tuple(size_2d)}',
                                          lambda e: self._prepare_long_term(e, size_2d))
        st_v = torch.cat([short_term_memory.value, short_term_memory.id_value], dim=1)
        lt_out, _ = self.long_term_attn.attend(q, lt_mem, gate, size_2d)
        st_out, _ = self.short_term_attn(seq_to_2d(q, size_2d), short_term_memory.key, st_v,
                                         gate, size_2d)
        lt_vis, lt_id = torch.split(lt_out, self.d_model, dim=-1)
        st_vis, st_id = torch.split(st_out, self.d_model, dim=-1)
        mix = self.droppath if self.droppath_lst else self.lst_dropout
        tgt = tgt + mix(lt_vis + st_vis)
        tgt_id = tgt_id + mix(lt_id + st_id)

        z = torch.cat([self.norm2(tgt), self.id_norm2(tgt_id)], dim=-1)
        sa_out, _ = self.self_attn(z, z, z, z, size_2d)
        sa_vis, sa_id = torch.split(sa_out, self.d_model, dim=-1)
        tgt = tgt + self.droppath(sa_vis)
        tgt_id = tgt_id + self.droppath(sa_id)
        return tgt, tgt_id, curr, ref


class DualBranchGPM(nn.Module):
    """The DeAOT propagation stack (``LSTT`` in the model; upstream name kept).

    Returns, per layer, ``[tgt | tgt_id]`` ``(L, B, 2d)``; the last one goes through
    ``decoder_norms[-1]`` (GroupNorm with 2 groups: visual and ID halves normalised
    separately) and feeds the decoder.
    """

    def __init__(self, num_layers=2, d_model=256, self_nhead=1, att_nhead=1, emb_dropout=0.0,
                 droppath=0.1, lt_dropout=0.0, st_dropout=0.0, droppath_lst=False,
                 droppath_scaling=False, return_intermediate=True, intermediate_norm=False,
                 final_norm=True, lt_attention='vanilla', gda=None):
        super().__init__()
        self.intermediate_norm = intermediate_norm
        self.final_norm = final_norm
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.emb_dropout = nn.Dropout(emb_dropout, True)
        layers = []
        for idx in range(num_layers):
            p = layer_drop_path_rate(droppath, idx, num_layers, droppath_scaling)
            layers.append(GatedPropagationModule(
                d_model, self_nhead, att_nhead, droppath=p, lt_dropout=lt_dropout,
                st_dropout=st_dropout, droppath_lst=droppath_lst, layer_idx=idx,
                lt_attention=lt_attention, gda=gda))
        self.layers = nn.ModuleList(layers)
        num_norms = (num_layers - 1 if intermediate_norm else 0) + (1 if final_norm else 0)
        self.decoder_norms = nn.ModuleList(GroupNorm1D(2 * d_model, 2) for _ in range(num_norms))

    def forward(self, tgt, long_term_memories: List[Optional[MemoryEntry]],
                short_term_memories: List[Optional[MemoryEntry]], curr_id_emb=None,
                self_pos=None, size_2d=None):
        """Returns ``(outputs, currs, refs)``: per-layer outputs ``(L, B, 2d)`` and memory
        entries (see :class:`GatedPropagationModule`)."""
        output = self.emb_dropout(tgt)
        output_id = None
        outputs, currs, refs = [], [], []
        for idx, layer in enumerate(self.layers):
            output, output_id, curr, ref = layer(
                output, output_id, long_term_memories[idx], short_term_memories[idx],
                curr_id_emb=curr_id_emb, self_pos=self_pos, size_2d=size_2d)
            outputs.append(torch.cat([output, output_id], dim=2))
            currs.append(curr)
            refs.append(ref)
        if self.final_norm:
            if self.intermediate_norm:
                outputs = [norm(o) for norm, o in zip(self.decoder_norms, outputs)]
            else:
                outputs[-1] = self.decoder_norms[-1](outputs[-1])
        if not self.return_intermediate:
            outputs = outputs[-1:]
        return outputs, currs, refs
