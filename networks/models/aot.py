"""AOT model (Yang et al., NeurIPS 2021): encoder, ID bank, LSTT propagation, FPN decoder.

The model is a plain container of sub-networks plus the per-step functions the engines
call (``encode_image``, ``get_id_emb``, ``LSTT_forward``, ``decode_id_logits``); all video
state lives in the engine. Building a model never reads a weight file.

Sub-module order (which fixes ``state_dict`` order): ``encoder``, ``encoder_projector``,
``LSTT``, ``decoder``, ``patch_wise_id_bank`` (+ ``id_norm`` in DeAOT).
"""
import torch
import torch.nn as nn

from networks.decoders import build_decoder
from networks.encoders import build_encoder
from networks.layers.lstt import LongShortTermTransformer
from networks.layers.position import PositionEmbeddingSine


def propagation_args(cfg):
    """Positional and keyword arguments of the propagation module (LSTT, or DeAOT's GPM)
    from the config: the same for AOT and DeAOT."""
    args = (cfg.MODEL_LSTT_NUM, cfg.MODEL_ENCODER_EMBEDDING_DIM, cfg.MODEL_SELF_HEADS,
            cfg.MODEL_ATT_HEADS)
    kwargs = dict(emb_dropout=cfg.TRAIN_LSTT_EMB_DROPOUT, droppath=cfg.TRAIN_LSTT_DROPPATH,
                  lt_dropout=cfg.TRAIN_LSTT_LT_DROPOUT, st_dropout=cfg.TRAIN_LSTT_ST_DROPOUT,
                  droppath_lst=cfg.TRAIN_LSTT_DROPPATH_LST,
                  droppath_scaling=cfg.TRAIN_LSTT_DROPPATH_SCALING,
                  intermediate_norm=cfg.MODEL_DECODER_INTERMEDIATE_LSTT,
                  return_intermediate=True)
    return args, kwargs


class AOT(nn.Module):
    def __init__(self, cfg, encoder='mobilenetv2', decoder='fpn'):
        super().__init__()
        self.cfg = cfg
        self.max_obj_num = cfg.MODEL_MAX_OBJ_NUM
        self.channels_last = False  # set_channels_last: encoder in NHWC layout (CPU speed)
        self.epsilon = cfg.MODEL_EPSILON
        d = cfg.MODEL_ENCODER_EMBEDDING_DIM

        self.encoder = build_encoder(encoder, frozen_bn=cfg.MODEL_FREEZE_BN,
                                     freeze_at=cfg.TRAIN_ENCODER_FREEZE_AT)
        self.encoder_projector = nn.Conv2d(cfg.MODEL_ENCODER_DIM[-1], d, kernel_size=1)
        self.LSTT = self._build_propagation(cfg)
        self.decoder = build_decoder(
            decoder, in_dim=self._decoder_in_dim(cfg), out_dim=cfg.MODEL_MAX_OBJ_NUM + 1,
            decode_intermediate_input=cfg.MODEL_DECODER_INTERMEDIATE_LSTT, hidden_dim=d,
            shortcut_dims=cfg.MODEL_ENCODER_DIM, align_corners=cfg.MODEL_ALIGN_CORNERS)
        # The ID bank turns an 11-channel one-hot mask into 16x ID embeddings. With
        # align_corners inputs are 16k+1 pixels, so kernel 17 / pad 8 gives k+1 cells.
        if cfg.MODEL_ALIGN_CORNERS:
            self.patch_wise_id_bank = nn.Conv2d(cfg.MODEL_MAX_OBJ_NUM + 1, d, kernel_size=17,
                                                stride=16, padding=8)
        else:
            self.patch_wise_id_bank = nn.Conv2d(cfg.MODEL_MAX_OBJ_NUM + 1, d, kernel_size=16,
                                                stride=16, padding=0)
        self.id_dropout = nn.Dropout(cfg.TRAIN_LSTT_ID_DROPOUT, True)
        self.pos_generator = PositionEmbeddingSine(d // 2, normalize=True)
        self._init_weight()
        if cfg.MODEL_FREEZE_BACKBONE:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    # -- construction -----------------------------------------------------------------
    def _build_propagation(self, cfg):
        args, kwargs = propagation_args(cfg)
        return LongShortTermTransformer(*args, **kwargs)

    def _decoder_in_dim(self, cfg):
        d = cfg.MODEL_ENCODER_EMBEDDING_DIM
        return d * (cfg.MODEL_LSTT_NUM + 1) if cfg.MODEL_DECODER_INTERMEDIATE_LSTT else d

    def _init_weight(self):
        nn.init.xavier_uniform_(self.encoder_projector.weight)
        k = self.patch_wise_id_bank.kernel_size[0]
        w = self.patch_wise_id_bank.weight
        with torch.no_grad():
            flat = torch.empty(w.shape[0], w[0].numel())
            nn.init.orthogonal_(flat, gain=k ** -2)
            w.copy_(flat.view_as(w))

    def set_channels_last(self, enabled=True):
        """Run the image encoder (and its projector) in channels-last memory layout.

        On the CPU, oneDNN's convolutions of the MobileNetV2 encoder are faster on NHWC
        tensors (docs/benchmark.md); the values do not change (same kernels' arithmetic:
        ``tests/test_attention_impl.py`` checks the golden engine run with it on). Only the
        layout of the weights and of the input changes, so ``state_dict`` is unaffected.
        Returns ``self``.
        """
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.encoder.to(memory_format=fmt)
        self.encoder_projector.to(memory_format=fmt)
        self.channels_last = bool(enabled)
        return self

    # -- steps used by the engines ----------------------------------------------------
    def encode_image(self, img):
        """``(B, 3, H, W)`` -> ``[x4, x8, x16, projected x16b]``."""
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        xs = self.encoder(img)
        xs[-1] = self.encoder_projector(xs[-1])
        return xs

    def get_pos_emb(self, x):
        return self.pos_generator(x)

    def get_id_emb(self, x):
        """One-hot ``(B, 1+N, H, W)`` -> ID embedding ``(B, d, h, w)``."""
        return self.id_dropout(self.patch_wise_id_bank(x))

    def LSTT_forward(self, curr_embs, long_term_memories, short_term_memories,
                     curr_id_emb=None, pos_emb=None, size_2d=(30, 30)):
        """Run the propagation stack on the projected 16x map ``curr_embs[-1]``.

        Returns ``(outputs, currs, refs)`` (per-layer lists; see the LSTT classes).
        """
        B, C, h, w = curr_embs[-1].shape
        tokens = curr_embs[-1].view(B, C, h * w).permute(2, 0, 1)
        return self.LSTT(tokens, long_term_memories, short_term_memories, curr_id_emb,
                         pos_emb, size_2d)

    def decode_id_logits(self, lstt_embs, shortcuts):
        """Per-layer ``(L, B, C)`` outputs + encoder list -> ``(B, 1+N, H/4, W/4)``."""
        B, _, h, w = shortcuts[-1].shape
        inputs = [shortcuts[-1]]
        for emb in lstt_embs:
            inputs.append(emb.view(h, w, B, -1).permute(2, 3, 0, 1))
        return self.decoder(inputs, shortcuts)
