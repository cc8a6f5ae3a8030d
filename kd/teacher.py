"""The frozen teacher of distillation: a pretrained VOS model run on the student's clip.

The teacher sees exactly the clip the student sees, conditioned on the same reference
(frame-0) mask, and propagates it the way it would at inference: its memory is written
with its own predictions (argmax), never with ground truth. For every propagated frame it
returns a :class:`TeacherFrame` with

* ``logits`` ``(B, 1+N, H/4, W/4)``: decoder output in object order (the teacher never
  shuffles IDs), unused ID channels at DeAOT's fill value (-1e10, or -1e4 under fp16);
* ``label`` ``(B, H, W)`` int64: the pseudo-label, the argmax of the logits resized to the
  input size (what both networks write into memory);
* ``attention``: the tensor captured from the chosen GPM layer's long-term attention
  (``'id_out'``: ID half of the gated output ``(B, L, 512)``; ``'attn'``: softmax map
  ``(B, heads, L, N_keys)``), or ``None`` when capture is off.

Frozen means: every parameter has ``requires_grad=False``, the module is in eval mode and
stays there whatever ``train()`` is asked (dropout and drop-path off), everything runs
under ``torch.no_grad()``, and the teacher is kept out of the student's optimizer,
checkpoints and DDP wrapper by whoever holds it (see ``kd.distiller``).

The API is frame by frame (``start`` then ``next_frame``) so that a distillation step can
interleave the two networks and keep only one frame's attention maps alive; ``forward``
runs a whole clip for convenience.
"""
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

# One home for cutting a clip's encoder outputs into frames: the engines'.
from networks.engines.aot_engine import split_frames as split_clip_embeddings
from networks.engines import build_engine
from networks.models import load_vos_model

logger = logging.getLogger(__name__)

__all__ = ['RANDOM_TEACHER', 'ATTENTION_TENSORS', 'TeacherFrame', 'Teacher', 'build_teacher',
           'split_clip_embeddings']

# ``--teacher_ckpt random``: a randomly initialised teacher, for tests and smoke runs only.
RANDOM_TEACHER = 'random'
ATTENTION_TENSORS = ('id_out', 'attn')


@dataclass
class TeacherFrame:
    """Teacher outputs for one propagated frame (see the module docstring for shapes)."""
    logits: torch.Tensor
    label: torch.Tensor
    attention: Optional[torch.Tensor] = None


def check_attention_layer(model, layer, who):
    """Validate a 1-based GPM layer index against ``model``; returns the 0-based index."""
    num_layers = len(model.LSTT.layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ValueError(f'{who}: GPM layer {layer!r} does not exist; this model has '
                         f'{num_layers} layer(s), numbered 1..{num_layers} (1-based, as in the '
                         f'paper)')
    if not hasattr(model, 'capture_attention'):
        raise ValueError(f'{who}: {type(model).__name__} cannot capture its attention maps '
                         f'(only DeAOT models can, e.g. --model deaott_gda); or turn the '
                         f'attention term off (KD_ATT_LOSS="none" or KD_LAMBDA=0)')
    return layer - 1


class Teacher(nn.Module):
    """A frozen VOS model driven frame by frame on a clip.

    Args:
        model: a DeAOT (or AOT, without attention capture) model; it is frozen in place.
        layer: 1-based GPM layer whose long-term attention is captured (the paper's
            "attention map 3" of R50-DeAOT-L is ``layer=3``).
        tensor: ``'id_out'`` or ``'attn'`` (see the module docstring).
        capture: capture attention at all (off when the attention loss is off, which also
            keeps the vanilla attention on its fused kernel).
        long_term_mem_gap: long-term memory gap; ``None`` takes the model config's
            ``TRAIN_LONG_TERM_MEM_GAP`` (the teacher's own training setting on clips).
    """

    def __init__(self, model, layer=3, tensor='id_out', capture=True, long_term_mem_gap=None):
        super().__init__()
        if tensor not in ATTENTION_TENSORS:
            raise ValueError(f'teacher attention tensor must be one of {ATTENTION_TENSORS}, '
                             f'got {tensor!r}')
        self.capture = bool(capture)
        self.layer = layer
        who = f"teacher {getattr(model.cfg, 'MODEL_ID', '')!r} (KD_TEACHER_LAYER)"
        self._layer_idx = check_attention_layer(model, layer, who) if self.capture else None
        self.tensor = tensor
        cfg = model.cfg
        gap = cfg.TRAIN_LONG_TERM_MEM_GAP if long_term_mem_gap is None else long_term_mem_gap
        model.requires_grad_(False)
        self.model = model
        self.engine = build_engine(cfg.MODEL_ENGINE, 'train', aot_model=model,
                                   long_term_mem_gap=int(gap))
        self.long_term_mem_gap = int(gap)
        self._embs = None
        self._pending_label = None
        self.train(False)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def num_layers(self):
        return len(self.model.LSTT.layers)

    def train(self, mode=True):
        # A teacher is never trained: whatever a caller (or a parent module) asks, keep
        # dropout, drop-path and ID dropout off so its outputs are deterministic.
        return super().train(False)

    def _capture(self):
        if not self.capture:
            return contextlib.nullcontext()
        return self.model.capture_attention(self._layer_idx)

    @torch.no_grad()
    def start(self, frames, ref_mask, obj_nums):
        """Encode a clip and condition on its reference mask.

        Args:
            frames: ``(T*B, 3, H, W)`` frame-major (frame 0 of every sample first).
            ref_mask: ``(B, 1, H, W)`` or ``(B, H, W)`` labels of frame 0.
            obj_nums: ``B`` object counts.
        """
        batch_size = len(obj_nums)
        if frames.shape[0] % batch_size or frames.shape[0] < 2 * batch_size:
            raise ValueError(f'teacher: frames {tuple(frames.shape)} must hold T >= 2 frames of '
                             f'{batch_size} samples, frame-major (T*B, 3, H, W)')
        self.engine.restart_engine(batch_size, enable_id_shuffle=False)
        self._embs = split_clip_embeddings(self.model.encode_image(frames), batch_size)
        self._pending_label = None
        self.engine.add_reference_frame(mask=ref_mask, frame_step=0, obj_nums=list(obj_nums),
                                        img_embs=self._embs[0])

    @property
    def num_frames(self):
        return 0 if self._embs is None else len(self._embs)

    @torch.no_grad()
    def next_frame(self):
        """Propagate to the next frame of the clip and return its :class:`TeacherFrame`.

        The previous frame's pseudo-label is written into memory first (lazily, so the
        last frame of a clip costs no memory write).
        """
        if self._embs is None:
            raise RuntimeError('teacher: call start(frames, ref_mask, obj_nums) first')
        engine = self.engine
        step = engine.frame_step + 1
        if step >= len(self._embs):
            raise IndexError(f'teacher: the clip has {len(self._embs)} frames; frame {step} '
                             f'does not exist')
        if self._pending_label is not None:
            engine.update_short_term_memory(self._pending_label)
            self._pending_label = None
        with self._capture() as store:
            engine.match_propogate_one_frame(img_embs=self._embs[step])
        logits = engine.decode_current_logits()
        label = engine.predict_current_mask()
        self._pending_label = label
        attention = store[self.tensor] if store is not None else None
        return TeacherFrame(logits=logits, label=label, attention=attention)

    def reset(self):
        """Drop the clip's encodings and memory (frees their storage between steps)."""
        self._embs = None
        self._pending_label = None
        self.engine.restart_engine(1, enable_id_shuffle=False)

    @torch.no_grad()
    def forward(self, frames, ref_mask, obj_nums) -> List[TeacherFrame]:
        """Run a whole clip: one :class:`TeacherFrame` per propagated frame (1..T-1)."""
        self.start(frames, ref_mask, obj_nums)
        out = [self.next_frame() for _ in range(1, self.num_frames)]
        self.reset()
        return out

    def extra_repr(self):
        return (f'layer={self.layer}, tensor={self.tensor!r}, capture={self.capture}, '
                f'long_term_mem_gap={self.long_term_mem_gap}')


def build_teacher(model_id, ckpt_path, device='cpu', layer=3, tensor='id_out', capture=True,
                  long_term_mem_gap=None, seed=0):
    """Build, load and freeze a teacher.

    Args:
        model_id: a model id under ``configs/models`` (e.g. ``'r50_deaotl'``).
        ckpt_path: the teacher's weights (any layout ``utils.checkpoint`` reads), loaded
            strictly. ``'random'`` builds a randomly initialised teacher (seeded by
            ``seed``, so every process and run gets the same one): for tests and smoke
            runs only, never for real distillation.
        device, layer, tensor, capture, long_term_mem_gap: see :class:`Teacher`.
    Raises:
        ValueError: no checkpoint given. FileNotFoundError: the checkpoint file is missing
        (the message names it). CheckpointMismatchError: it does not fit ``model_id``.
    """
    if not ckpt_path:
        raise ValueError(f'no checkpoint for the teacher {model_id!r}: set KD_TEACHER_CKPT '
                         f'(flag --teacher_ckpt) to its weights, e.g. '
                         f'./pretrain_models/R50_DeAOTL_PRE_YTB_DAV.pth, or to '
                         f'{RANDOM_TEACHER!r} for a random teacher in tests')
    ckpt_path = os.fspath(ckpt_path)
    if ckpt_path == RANDOM_TEACHER:
        logger.warning('teacher %s has RANDOM weights (--teacher_ckpt %s): fine for tests, '
                       'meaningless for distillation', model_id, RANDOM_TEACHER)
        # Seeded on a forked RNG: identical across processes, and the caller's stream is
        # left where it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, model, _ = load_vos_model(model_id, None, device=device)
    else:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(
                f'teacher checkpoint not found: {ckpt_path} (KD_TEACHER_CKPT / --teacher_ckpt '
                f'for the teacher {model_id!r}); download the released weights into that path '
                f'or pass another file')
        _, model, _ = load_vos_model(model_id, ckpt_path, device=device)
    return Teacher(model, layer=layer, tensor=tensor, capture=capture,
                   long_term_mem_gap=long_term_mem_gap).to(device)
