"""DeAOT model (Yang & Yang, NeurIPS 2022): AOT with a dual-branch Gated Propagation
Module (``DualBranchGPM``) and a layer-normalised ID embedding.

``cfg.MODEL_LT_ATTENTION = 'deformable'`` swaps each layer's long-term attention for
Gated Deformable Attention (the GDA students); every other parameter keeps its name, so
vanilla DeAOT checkpoints load into GDA models with only the offset networks new.
"""
import contextlib

import torch.nn as nn

from networks.layers.transformer import DualBranchGPM

from .aot import AOT, propagation_args


def gda_kwargs(cfg):
    """GDA constructor arguments from the ``MODEL_GDA_*`` config fields."""
    return dict(grid=cfg.MODEL_GDA_GRID, groups=cfg.MODEL_GDA_GROUPS,
                kernel=cfg.MODEL_GDA_KERNEL, offset_scale=cfg.MODEL_GDA_OFFSET_SCALE,
                no_offset=cfg.MODEL_GDA_NO_OFFSET)


class DeAOT(AOT):
    def __init__(self, cfg, encoder='mobilenetv2', decoder='fpn'):
        super().__init__(cfg, encoder, decoder)
        self.id_norm = nn.LayerNorm(cfg.MODEL_ENCODER_EMBEDDING_DIM)
        self._init_weight()

    def _build_propagation(self, cfg):
        kind = cfg.MODEL_LT_ATTENTION
        args, kwargs = propagation_args(cfg)
        return DualBranchGPM(*args, **kwargs, lt_attention=kind,
                             gda=gda_kwargs(cfg) if kind == 'deformable' else None)

    def _decoder_in_dim(self, cfg):
        return 2 * cfg.MODEL_ENCODER_EMBEDDING_DIM

    def get_id_emb(self, x):
        emb = self.patch_wise_id_bank(x)                       # (B, d, h, w)
        emb = self.id_norm(emb.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
        return self.id_dropout(emb)

    @contextlib.contextmanager
    def capture_attention(self, layer_idx=-1):
        """Record the long-term attention of one GPM layer while the block runs.

        Yields a dict that receives ``'attn'`` (softmax over memory keys,
        ``(B, heads, L, N)``) and ``'id_out'`` (ID half of the attention output,
        ``(B, L, E/2)``) at every propagation pass of that layer. Nothing is computed or
        kept outside the block.
        """
        attn_module = self.LSTT.layers[layer_idx].long_term_attn
        store = {}
        attn_module.capture = store
        try:
            yield store
        finally:
            attn_module.capture = None
