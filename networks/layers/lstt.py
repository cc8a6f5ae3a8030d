"""AOT's Long Short-Term Transformer (LSTT): the propagation stack of the AOT model ids
(aott, aots, aotb, aotl, r50_aotl, r101_aotl, swinb_aotl).

Each block (upstream ``LongShortTermTransformerBlock``, "v1") runs three pre-norm residual
branches on sequence-first tokens ``(L, B, d)``, ``L = h * w`` row-major:

1. self-attention, with the sine position embedding added to its queries and keys;
2. long/short-term attention: ``Q = K = linear_Q(x)``, and the memory values are
   ``linear_V(x + id_emb)`` of the stored frames. Long-term attention is global over all
   stored frames; short-term attention looks at a 15x15 window of the previous frame and
   adds learnt relative-position terms to both the logits and the aggregated values;
3. feed-forward: Linear -> GroupNorm + GELU + depthwise 5x5 -> Linear.

Parameter names and the state-dict order follow upstream, so AOT checkpoints load with
``strict=True`` (under the model's ``LSTT.`` prefix).
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basic import DropPath, GNActDWConv2d, layer_drop_path_rate, map_to_seq, seq_to_2d
from .local_window import LOCAL_IMPLS, mask_out_of_image
from .memory_entry import MemoryEntry


def _xavier_init(module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _set_head_sizes(module, d_model, num_head):
    """The per-head sizes (and softmax temperature) both AOT attentions use."""
    if d_model % num_head:
        raise ValueError(f'd_model ({d_model}) must be divisible by num_head ({num_head})')
    module.d_model = d_model
    module.num_head = num_head
    module.head_dim = d_model // num_head
    module.T = module.head_dim ** 0.5


class MultiheadAttention(nn.Module):
    """Global multi-head attention (upstream ``MultiheadAttention`` as AOT uses it).

    ``use_linear=True`` (self-attention) adds ``linear_Q/K/V``; the long-term attention
    receives projected keys/values and only has the output ``projection``. Queries are
    divided by ``sqrt(d_model / num_head)`` before the dot product, as upstream.

    The aggregation runs through ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels, no ``Lq x Lk`` matrix where available); the explicit
    softmax path is taken only when the attention map is requested.
    """

    def __init__(self, d_model, num_head=8, dropout=0.0, use_linear=True):
        super().__init__()
        _set_head_sizes(self, d_model, num_head)
        self.use_linear = use_linear
        if use_linear:
            self.linear_Q = nn.Linear(d_model, d_model)
            self.linear_K = nn.Linear(d_model, d_model)
            self.linear_V = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(d_model, d_model)
        self.global_impl = 'sdpa'  # or 'explicit': networks/layers/attention_impl.py
        _xavier_init(self)

    def forward(self, Q, K, V, need_weights=False):
        """
        Args:
            Q: ``(Lq, B, d)``; K, V: ``(Lk, B, d)``.
            need_weights: also return the attention map.
        Returns:
            ``(Lq, B, d)`` and the attention ``(B, H, Lq, Lk)`` (None unless requested).
        """
        if self.use_linear:
            Q, K, V = self.linear_Q(Q), self.linear_K(K), self.linear_V(V)
        Lq, B, _ = Q.shape
        H, c = self.num_head, self.head_dim
        q = (Q / self.T).view(Lq, B, H, c).permute(1, 2, 0, 3)    # (B, H, Lq, c)
        k = K.view(-1, B, H, c).permute(1, 2, 0, 3)                # (B, H, Lk, c)
        v = V.view(-1, B, H, c).permute(1, 2, 0, 3)                # (B, H, Lk, c)
        attn = None
        if need_weights or self.global_impl == 'explicit':
            attn = self.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1))
            out = attn @ v
        else:
            p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=1.0)
        out = out.permute(2, 0, 1, 3).reshape(Lq, B, self.d_model)
        return self.projection(out), attn


class MultiheadLocalAttention(nn.Module):
    """Short-term attention over a ``(2*max_dis+1)^2`` window (upstream
    ``MultiheadLocalAttentionV2`` math; V3 has the same parameters).

    For head ``g`` and query position ``p``, over window positions ``n``::

        logit[n] = <q_p / sqrt(c), k_{p+off(n)}> + relative_emb_k(q)[g, n, p]
        attn     = softmax_n(logit), with positions outside the image masked
        out_p    = sum_n attn[n] * (v_{p+off(n)} + relative_emb_v[g, :, n])

    Keys/values outside the image are zeros (and masked). ``relative_emb_k`` is a grouped
    1x1 conv of the *unscaled* query. Computed with exact tiled windows
    (:mod:`networks.layers.local_window`), never a dense ``L x L`` matrix.
    """

    def __init__(self, d_model, num_head=8, dropout=0.0, max_dis=7, dilation=1):
        super().__init__()
        _set_head_sizes(self, d_model, num_head)
        self.max_dis = max_dis
        self.dilation = dilation
        self.window_size = 2 * max_dis + 1
        W2 = self.window_size ** 2
        self.relative_emb_k = nn.Conv2d(d_model, num_head * W2, kernel_size=1, groups=num_head)
        # Upstream starts it at zero; the owning block's xavier init then overwrites it.
        self.relative_emb_v = nn.Parameter(torch.zeros(num_head, self.head_dim, W2))
        self.dropout = nn.Dropout(dropout)
        self.local_impl = 'tiled'  # or 'dense': networks/layers/attention_impl.py
        self.projection = nn.Linear(d_model, d_model)

    def forward(self, q, k, v, need_weights=False):
        """
        Args:
            q, k, v: ``(B, d, h, w)`` maps (query frame, memory frame).
        Returns:
            ``(h*w, B, d)`` and the window attention ``(B, H, W*W, h*w)`` (None unless
            requested).
        """
        B, _, h, w = q.shape
        H, c = self.num_head, self.head_dim
        W2 = self.window_size ** 2
        rel_k = self.relative_emb_k(q).view(B * H, W2, h, w)
        window_logits, window_aggregate = LOCAL_IMPLS[self.local_impl]
        logits = window_logits((q / self.T).reshape(B * H, c, h, w),
                                     k.reshape(B * H, c, h, w), self.max_dis, self.dilation)
        logits = mask_out_of_image(logits + rel_k, self.max_dis, self.dilation)
        attn = self.dropout(torch.softmax(logits, dim=1))              # (B*H, W2, h, w)
        out = window_aggregate(attn, v.reshape(B * H, c, h, w),
                                     self.max_dis, self.dilation)      # (B*H, c, h, w)
        # Relative value term: sum_n attn[n] * relative_emb_v[g, :, n].
        attn5 = attn.view(B, H, W2, h, w)
        out = out.view(B, H, c, h, w) + torch.einsum('bgnyx,gcn->bgcyx', attn5,
                                                     self.relative_emb_v.to(attn.dtype))
        out = self.projection(map_to_seq(out.reshape(B, self.d_model, h, w)))
        return out, (attn5.reshape(B, H, W2, h * w) if need_weights else None)


class LongShortTermTransformerBlock(nn.Module):
    """One LSTT layer (upstream ``LongShortTermTransformerBlock``, block version v1).

    Submodules are registered in upstream's order so ``state_dict()`` lists the keys
    exactly as upstream does: ``norm1`` (before self-attention), ``linear_Q``,
    ``linear_V``, ``long_term_attn``, ``short_term_attn``, ``norm2`` (before
    long/short-term attention), ``self_attn``, ``norm3``, ``linear1``, ``activation``,
    ``linear2``.
    """

    def __init__(self, d_model=256, self_nhead=8, att_nhead=8, dim_feedforward=1024,
                 droppath=0.1, lt_dropout=0.0, st_dropout=0.0, droppath_lst=False,
                 activation='gelu', local_dilation=1, max_local_dis=7):
        super().__init__()
        if activation != 'gelu':
            # Upstream accepts the argument but always uses GroupNorm + GELU.
            raise ValueError(f"AOT's feed-forward uses GELU; activation={activation!r} "
                             f"is not supported")
        self.d_model = d_model
        self.norm1 = nn.LayerNorm(d_model)
        self.linear_Q = nn.Linear(d_model, d_model)
        self.linear_V = nn.Linear(d_model, d_model)
        self.long_term_attn = MultiheadAttention(d_model, att_nhead, dropout=lt_dropout,
                                                 use_linear=False)
        self.short_term_attn = MultiheadLocalAttention(d_model, att_nhead, dropout=st_dropout,
                                                       max_dis=max_local_dis,
                                                       dilation=local_dilation)
        self.lst_dropout = nn.Dropout(max(lt_dropout, st_dropout))
        self.droppath_lst = droppath_lst

        self.norm2 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, self_nhead)

        self.norm3 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = GNActDWConv2d(dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

        self.droppath = DropPath(droppath, batch_dim=1)
        _xavier_init(self)

    def fuse_key_value_id(self, curr: MemoryEntry, id_emb) -> MemoryEntry:
        """Memory entry of a frame whose mask is known.

        Args:
            curr: the frame's ``curr`` entry from :meth:`forward` (``key`` = its K,
                ``value`` = its normalised tokens), sequence-first ``(L, B, d)``.
            id_emb: ``(L, B, d)`` ID embedding of the frame's mask.
        Returns:
            ``MemoryEntry(key=K, value=linear_V(value + id_emb))``: K is reused as is,
            only the value carries the identities.
        """
        return MemoryEntry(curr.key, self.linear_V(curr.value + id_emb))

    def forward(self, tgt, long_term_memory: Optional[MemoryEntry] = None,
                short_term_memory: Optional[MemoryEntry] = None, curr_id_emb=None,
                self_pos=None, size_2d=(30, 30)):
        """
        Args:
            tgt: ``(L, B, d)`` tokens of the current frame, ``L = h * w``.
            long_term_memory: stored frames concatenated along tokens, sequence-first
                ``key``/``value`` ``(Lm, B, d)``.
            short_term_memory: the previous frame's ``key``/``value`` as ``(B, d, h, w)``.
            curr_id_emb: ``(L, B, d)`` ID embedding for a reference pass; then the frame's
                own fused K/V act as long- and short-term memory and both memory
                arguments are ignored.
            self_pos: ``(L, B, d)`` position embedding, added to the self-attention
                queries and keys (not values); None for none.
            size_2d: ``(h, w)`` token grid.
        Returns:
            ``(tgt, curr, ref)``: the updated ``(L, B, d)`` tokens; ``curr`` =
            ``MemoryEntry(key=K, value=normalised tokens)`` of this frame (feed it to
            :meth:`fuse_key_value_id` once the mask is known); ``ref`` = the fused
            sequence-first entry this pass attended to if ``curr_id_emb`` was given,
            else None.
        """
        h, w = size_2d
        if tgt.shape[0] != h * w:
            raise ValueError(f'tgt has {tgt.shape[0]} tokens but size_2d={tuple(size_2d)} '
                             f'gives {h * w}')
        if curr_id_emb is None and (long_term_memory is None or short_term_memory is None):
            raise ValueError('a propagation pass needs long- and short-term memory '
                             '(or pass curr_id_emb for a reference pass)')

        # Self-attention: position only on queries and keys.
        x = self.norm1(tgt)
        qk = x if self_pos is None else x + self_pos
        tgt = tgt + self.droppath(self.self_attn(qk, qk, x)[0])

        # Long/short-term attention: keys are the queries of the stored frames.
        x = self.norm2(tgt)
        curr_Q = self.linear_Q(x)
        curr = MemoryEntry(curr_Q, x)
        ref = None
        if curr_id_emb is not None:
            ref = self.fuse_key_value_id(curr, curr_id_emb)
            long_term_memory = ref
            short_term_memory = ref.map(lambda t: seq_to_2d(t, size_2d))
        lt = self.long_term_attn(curr_Q, long_term_memory.key, long_term_memory.value)[0]
        st = self.short_term_attn(seq_to_2d(curr_Q, size_2d), short_term_memory.key,
                                  short_term_memory.value)[0]
        mix = self.droppath if self.droppath_lst else self.lst_dropout
        tgt = tgt + mix(lt + st)

        # Feed-forward.
        x = self.norm3(tgt)
        tgt = tgt + self.droppath(self.linear2(self.activation(self.linear1(x), size_2d)))
        return tgt, curr, ref


class LongShortTermTransformer(nn.Module):
    """The LSTT stack (``LSTT`` in the AOT model).

    The AOT model builds it as upstream does::

        LongShortTermTransformer(
            cfg.MODEL_LSTT_NUM, cfg.MODEL_ENCODER_EMBEDDING_DIM,
            cfg.MODEL_SELF_HEADS, cfg.MODEL_ATT_HEADS,        # dim_feedforward stays 1024
            emb_dropout=cfg.TRAIN_LSTT_EMB_DROPOUT, droppath=cfg.TRAIN_LSTT_DROPPATH,
            lt_dropout=cfg.TRAIN_LSTT_LT_DROPOUT, st_dropout=cfg.TRAIN_LSTT_ST_DROPOUT,
            droppath_lst=cfg.TRAIN_LSTT_DROPPATH_LST,
            droppath_scaling=cfg.TRAIN_LSTT_DROPPATH_SCALING,
            intermediate_norm=cfg.MODEL_DECODER_INTERMEDIATE_LSTT,
            return_intermediate=True)

    With AOT's defaults (intermediate_norm=True, final_norm=True) every layer's output
    gets its own LayerNorm ``decoder_norms[i]`` and the decoder concatenates them.
    ``mask_token`` ``(1, 1, d)`` is unused; it exists because upstream checkpoints hold it.
    """

    def __init__(self, num_layers=2, d_model=256, self_nhead=8, att_nhead=8,
                 dim_feedforward=1024, emb_dropout=0.0, droppath=0.1, lt_dropout=0.0,
                 st_dropout=0.0, droppath_lst=False, droppath_scaling=False,
                 activation='gelu', return_intermediate=False, intermediate_norm=True,
                 final_norm=True):
        super().__init__()
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.intermediate_norm = intermediate_norm
        self.final_norm = final_norm
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.mask_token = nn.Parameter(torch.randn(1, 1, d_model))

        layers = []
        for idx in range(num_layers):
            rate = layer_drop_path_rate(droppath, idx, num_layers, droppath_scaling)
            layers.append(LongShortTermTransformerBlock(
                d_model, self_nhead, att_nhead, dim_feedforward, droppath=rate,
                lt_dropout=lt_dropout, st_dropout=st_dropout, droppath_lst=droppath_lst,
                activation=activation))
        self.layers = nn.ModuleList(layers)

        num_norms = (num_layers - 1 if intermediate_norm else 0) + (1 if final_norm else 0)
        self.decoder_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_norms))

    def forward(self, tgt, long_term_memories: Optional[List[Optional[MemoryEntry]]] = None,
                short_term_memories: Optional[List[Optional[MemoryEntry]]] = None,
                curr_id_emb=None, self_pos=None, size_2d=None):
        """
        Args:
            tgt: ``(L, B, d)`` projected encoder tokens.
            long_term_memories, short_term_memories: per-layer entries (see
                :class:`LongShortTermTransformerBlock`), or None for a reference pass.
            curr_id_emb, self_pos: ``(L, B, d)``, shared by all layers.
            size_2d: ``(h, w)`` token grid.
        Returns:
            ``(outputs, currs, refs)``. ``outputs``: the per-layer outputs ``(L, B, d)``
            after the decoder norms (last: ``decoder_norms[-1]`` if ``final_norm``;
            others: ``decoder_norms[i]`` if ``intermediate_norm``), or only the last one
            when ``return_intermediate`` is False. ``currs``/``refs``: per-layer entries.
        """
        if size_2d is None:
            raise ValueError('size_2d (the (h, w) token grid) is required')
        output = self.emb_dropout(tgt)
        outputs, currs, refs = [], [], []
        for idx, layer in enumerate(self.layers):
            output, curr, ref = layer(
                output,
                None if long_term_memories is None else long_term_memories[idx],
                None if short_term_memories is None else short_term_memories[idx],
                curr_id_emb=curr_id_emb, self_pos=self_pos, size_2d=size_2d)
            outputs.append(output)
            currs.append(curr)
            refs.append(ref)
        if self.final_norm:
            outputs[-1] = self.decoder_norms[-1](outputs[-1])
        if self.intermediate_norm:
            outputs[:-1] = [norm(o) for norm, o in zip(self.decoder_norms, outputs[:-1])]
        if not self.return_intermediate:
            outputs = outputs[-1:]
        return outputs, currs, refs
