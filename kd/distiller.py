"""The distillation step: a student learns from a frozen teacher on clips without labels.

One step on a clip of ``T`` frames (paper Algorithm 1, Eq. 12)::

    both networks encode the clip and condition on the frame-0 mask (the only label read)
    for f = 1 .. T-1:
        teacher: propagate f -> logits z_t, pseudo-label m_f = argmax, attention F_t
        student: propagate f -> logits z_s, attention F_s (same query tokens)
        L_f = L_inter(z_s, z_t) + L_intra(z_s, z_t) + lambda * L_att(F_s, F_t)
        student memory <- m_f (KD_MEMORY_LABELS='teacher') or its own argmax ('student')
    loss = mean_f L_f

Ground truth beyond the reference mask is never read: :func:`clip_from_batch` takes the
frames, ``ref_label`` and the object counts, nothing else. Logits are compared in object
order (the engines un-shuffle IDs before returning them) over each sample's valid channels
(``kd.losses``). Attention is captured only when the attention term is on.

Pieces:

* :class:`DistillationEngine` (``nn.Module``): the student's training engine plus the
  losses; its ``forward`` runs one clip and returns ``(loss, logs)``. This is the module to
  wrap in ``DistributedDataParallel``. The teacher is deliberately *not* a registered
  submodule, so it is not in ``parameters()``, ``state_dict()``, ``.train()`` or DDP.
* :class:`Distiller`: the trainer's per-step strategy, ``step(batch, step) -> (loss, logs)``.
  The trainer keeps everything else (optimizer over the student only, backward, gradient
  clipping, EMA, checkpoints of the student only, logging).
* :func:`build_distiller`: teacher + distiller from the ``KD_*`` config fields
  (:mod:`kd.settings`: their defaults, validation and command-line switches).
"""
import contextlib
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.engines import build_engine
from networks.managers.train_step import (TrainStep, global_batch_shuffle,
                                          register_step_builder)

from .losses import DistillationLoss, valid_channels
# The settings and their flags live in kd/settings.py; their names stay importable from here.
from .settings import (ATTENTION_LOSSES, KD_DEFAULTS, MEMORY_LABELS, KDSettings,  # noqa: F401
                       add_kd_arguments, apply_kd_arguments, is_kd_config, kd_settings)
from .teacher import build_teacher, check_attention_layer, split_clip_embeddings

logger = logging.getLogger(__name__)

__all__ = ['KD_DEFAULTS', 'KDSettings', 'kd_settings', 'clip_from_batch', 'DistillationEngine',
           'Distiller', 'build_distiller', 'build_step', 'add_kd_arguments', 'apply_kd_arguments',
           'is_kd_config']

# ------------------------------------------------------------------------------------------
# batches


def clip_from_batch(batch, device=None):
    """A collated training batch -> ``(frames, ref_mask, obj_nums)``.

    ``frames``: ``(T*B, 3, H, W)`` frame-major (``ref_img``, ``prev_img``, ``curr_img``...);
    ``ref_mask``: ``(B, 1, H, W)`` (``ref_label``); ``obj_nums``: ``B`` ints
    (``meta['obj_num']``). No other label is read: distillation never sees ground truth
    beyond the reference frame.
    """
    for key in ('ref_img', 'prev_img', 'curr_img', 'ref_label', 'meta'):
        if key not in batch:
            raise KeyError(f'distillation batch has no {key!r} entry (has {sorted(batch)})')
    curr = batch['curr_img']
    curr = list(curr) if isinstance(curr, (list, tuple)) else [curr]
    frames = torch.cat([batch['ref_img'], batch['prev_img']] + curr, dim=0)
    ref_mask = batch['ref_label']
    obj_nums = batch['meta']['obj_num']
    obj_nums = [int(n) for n in (obj_nums.tolist() if torch.is_tensor(obj_nums) else obj_nums)]
    if device is not None:
        frames = frames.to(device, non_blocking=True)
        ref_mask = ref_mask.to(device, non_blocking=True)
    return frames, ref_mask, obj_nums


def resample_tokens(x, src_hw, dst_hw, token_dim):
    """Bilinearly resample the token axis ``token_dim`` of ``x`` from one grid to another.

    Rows of the attention tensors are query tokens laid out row-major on the 16x grid;
    CKA needs the same pixels as rows in both networks (docs/distillation.md).
    """
    if tuple(src_hw) == tuple(dst_hw):
        return x
    moved = x.movedim(token_dim, -1)
    lead = moved.shape[:-1]
    grid = moved.reshape(1, -1, *src_hw)
    grid = F.interpolate(grid.float(), size=tuple(dst_hw), mode='bilinear', align_corners=True)
    return grid.reshape(*lead, dst_hw[0] * dst_hw[1]).movedim(-1, token_dim).to(x.dtype)


# ------------------------------------------------------------------------------------------
# the step


class DistillationEngine(nn.Module):
    """Student engine + distillation losses over one clip (wrap this in DDP).

    Args:
        student_model: the student (a DeAOT, typically GDA), *not* DDP-wrapped.
        teacher: a :class:`kd.teacher.Teacher` on the same device; kept unregistered.
        cfg: the training config (``KD_*`` fields, ``MODEL_ENGINE``,
            ``TRAIN_LONG_TERM_MEM_GAP``).
    """

    def __init__(self, student_model, teacher, cfg):
        super().__init__()
        self.settings = kd_settings(cfg)
        s = self.settings
        student_cfg = student_model.cfg
        for field in ('MODEL_MAX_OBJ_NUM', 'MODEL_ALIGN_CORNERS'):
            if getattr(student_cfg, field) != getattr(teacher.cfg, field):
                raise ValueError(f'student and teacher disagree on {field}: '
                                 f'{getattr(student_cfg, field)!r} vs '
                                 f'{getattr(teacher.cfg, field)!r}; they must read the same '
                                 f'crops and compare the same ID channels')
        self.student_layer_idx = None
        if s.uses_attention:
            who = f"student {getattr(student_cfg, 'MODEL_ID', '')!r} (KD_STUDENT_LAYER)"
            self.student_layer_idx = check_attention_layer(student_model, s.student_layer, who)
            if not teacher.capture or teacher.tensor != s.att_tensor:
                raise ValueError(f'the teacher must capture {s.att_tensor!r} attention for '
                                 f'this config (built with capture={teacher.capture}, '
                                 f'tensor={teacher.tensor!r}); use build_distiller')
            if teacher.layer != s.teacher_layer:
                raise ValueError(f'teacher captures GPM layer {teacher.layer} but '
                                 f'KD_TEACHER_LAYER is {s.teacher_layer}')
            if s.att_loss == 'kl':
                seq_len = int(cfg.DATA_SEQ_LEN)
                gaps = (min(int(cfg.TRAIN_LONG_TERM_MEM_GAP), seq_len),
                        min(teacher.long_term_mem_gap, seq_len))
                if gaps[0] != gaps[1]:
                    raise ValueError(
                        "KD_ATT_LOSS='kl' needs the same memory (same keys) in both networks, "
                        f'but the student stores long-term memory every '
                        f'{cfg.TRAIN_LONG_TERM_MEM_GAP} frames and the teacher every '
                        f'{teacher.long_term_mem_gap}; set KD_TEACHER_MEM_GAP to '
                        f'{cfg.TRAIN_LONG_TERM_MEM_GAP} or use KD_ATT_LOSS=\'cka\'')
        self.engine = build_engine(student_cfg.MODEL_ENGINE, 'train', aot_model=student_model,
                                   long_term_mem_gap=cfg.TRAIN_LONG_TERM_MEM_GAP)
        self.criterion = DistillationLoss(
            lambda_att=s.lambda_att, attention_loss=s.att_loss, inter_weight=s.inter_weight,
            intra_weight=s.intra_weight, inter_min_channels=s.inter_min_channels)
        # Not a submodule on purpose (plain __dict__ entry): the teacher must stay out of
        # parameters(), state_dict(), .to()/.train() of the student and out of DDP.
        object.__setattr__(self, 'teacher', teacher)

    @property
    def student(self):
        return self.engine.AOT

    def _student_capture(self):
        if self.student_layer_idx is None:
            return contextlib.nullcontext()
        return self.student.capture_attention(self.student_layer_idx)

    def forward(self, frames, ref_mask, obj_nums, step=0, return_frames=False,
                id_shuffle_matrix=None):
        """Distil on one clip.

        Args:
            frames: ``(T*B, 3, H, W)`` frame-major, ``T >= 2``.
            ref_mask: ``(B, 1, H, W)`` labels of frame 0 (the only label used).
            obj_nums: ``B`` object counts (``<= MODEL_MAX_OBJ_NUM``).
            step: training step (unused by the recipe; kept for schedules).
            return_frames: also return per-frame records (detached tensors) for tests
                and diagnostics.
            id_shuffle_matrix: ``(B, 1+N, 1+N)`` ID permutations for the student (training
                with ``KD_ID_SHUFFLE`` only); ``None`` draws them from torch's global RNG.
        Returns:
            ``(loss, logs)``: the scalar loss (mean over frames 1..T-1) and detached scalar
            tensors ``kd_loss``, ``kd_inter``, ``kd_intra``, ``kd_att`` (unweighted, frame
            means) and ``kd_disagree`` (share of stride-4 pixels where the two argmax
            labels differ); with ``return_frames``, a third item: one dict per frame.
        """
        del step
        s = self.settings
        obj_nums = [int(n) for n in obj_nums]
        B = len(obj_nums)
        max_obj = self.student.max_obj_num
        if B == 0 or min(obj_nums) < 0 or max(obj_nums) > max_obj:
            raise ValueError(f'obj_nums must be {B} counts in 0..{max_obj}, got {obj_nums}')
        if frames.dim() != 4 or frames.shape[0] % B or frames.shape[0] < 2 * B:
            raise ValueError(f'frames {tuple(frames.shape)} must hold T >= 2 frames of {B} '
                             f'samples, frame-major (T*B, 3, H, W)')
        num_frames = frames.shape[0] // B
        teacher, engine = self.teacher, self.engine

        teacher.start(frames, ref_mask, obj_nums)
        shuffle = s.id_shuffle and self.training
        engine.restart_engine(B, enable_id_shuffle=shuffle,
                              id_shuffle_matrix=id_shuffle_matrix if shuffle else None)
        embs = split_clip_embeddings(self.student.encode_image(frames), B)
        engine.add_reference_frame(mask=ref_mask, frame_step=0, obj_nums=obj_nums,
                                   img_embs=embs[0])

        valid = None
        totals, inter, intra, att, disagree, records = [], [], [], [], [], []
        for f in range(1, num_frames):
            t_out = teacher.next_frame()
            with self._student_capture() as store:
                engine.match_propogate_one_frame(img_embs=embs[f])
            s_logits = engine.decode_current_logits()
            s_att = store[s.att_tensor] if store is not None else None
            if valid is None:
                valid = valid_channels(obj_nums, s_logits.shape[1], device=s_logits.device)
            cmp_logits = s_logits
            if s_logits.shape[-2:] != t_out.logits.shape[-2:]:
                cmp_logits = F.interpolate(s_logits, size=t_out.logits.shape[-2:],
                                           mode='bilinear', align_corners=engine.align_corners)
            if s_att is not None:
                token_dim = 1 if s_att.dim() == 3 else 2
                s_att = resample_tokens(s_att, engine.enc_size_2d, teacher.engine.enc_size_2d,
                                        token_dim)
            total, parts = self.criterion(cmp_logits, t_out.logits, valid, s_att,
                                          t_out.attention)
            totals.append(total)
            inter.append(parts['inter'])
            intra.append(parts['intra'])
            att.append(parts['att'])
            with torch.no_grad():
                disagree.append((cmp_logits.argmax(1) != t_out.logits.argmax(1)).float().mean())

            memory_label = None
            if f < num_frames - 1:
                if s.memory_labels == 'teacher':
                    memory_label = t_out.label
                else:
                    memory_label = engine.predict_current_mask().detach()
                engine.update_short_term_memory(memory_label)
            if return_frames:
                records.append({
                    'student_logits': s_logits.detach(), 'teacher_logits': t_out.logits,
                    'student_attention': None if s_att is None else s_att.detach(),
                    'teacher_attention': t_out.attention, 'teacher_label': t_out.label,
                    'memory_label': memory_label, 'loss': total.detach()})
        teacher.reset()

        loss = torch.stack(totals).mean()
        logs = {'kd_loss': loss.detach(), 'kd_inter': torch.stack(inter).mean().detach(),
                'kd_intra': torch.stack(intra).mean().detach(),
                'kd_att': torch.stack(att).mean().detach(),
                'kd_disagree': torch.stack(disagree).mean()}
        if return_frames:
            return loss, logs, records
        return loss, logs

    def extra_repr(self):
        s = self.settings
        return (f'teacher={s.teacher!r} layer {s.teacher_layer} -> student layer '
                f'{s.student_layer}, tensor={s.att_tensor!r}, memory_labels={s.memory_labels!r}')


class Distiller(TrainStep):
    """Per-step distillation strategy: the trainer's ``step_fn`` for KD stages.

    ``Distiller(student_model, teacher, cfg).step(batch, step) -> (loss, logs)`` (also
    ``distiller(batch, step)``) runs the clip through :class:`DistillationEngine` (or its DDP
    wrapper) and returns the loss to back-propagate and detached 0-d logs (``loss``,
    ``kd_inter``, ``kd_intra``, ``kd_att``, ``kd_disagree``, ``obj_num``). The trainer does
    the rest: ``loss.backward()``, clipping, ``optimizer.step()`` over
    :meth:`named_trainable_parameters` (the student's only), EMA and checkpoints of
    ``self.model`` (the student only). The teacher is never optimised, saved or wrapped.

    Args:
        student_model: the bare student model (the trainer's ``trainer.model``).
        teacher: a frozen :class:`kd.teacher.Teacher` on the student's device (see
            :func:`build_distiller`).
        cfg: the training config.
        rank, world_size, seed: as the trainer's; with them the students' ID shuffles are
            drawn for the whole global batch from ``(seed, step)``, as the supervised step
            does, so they do not depend on how the batch is split over processes.
    """

    def __init__(self, student_model, teacher, cfg, rank=0, world_size=1, seed=0):
        self.cfg = cfg
        self.model = student_model
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.engine = DistillationEngine(student_model, teacher, cfg)
        self.runner = self.engine

    @property
    def teacher(self):
        return self.engine.teacher

    @property
    def student(self):
        return self.model

    @property
    def settings(self):
        return self.engine.settings

    @property
    def device(self):
        return next(self.model.parameters()).device

    # -- the trainer's TrainStep interface ----------------------------------------------
    def train(self):
        self.engine.train()  # the teacher ignores it (kd.teacher.Teacher.train)

    def frozen_param_keys(self, step):
        # Distillation has no supervised sequential phase: nothing is frozen on a schedule.
        return []

    def wrap_distributed(self, wrap):
        """``wrap(module, find_unused_parameters=False)`` -> DDP; only the student engine
        is wrapped (every student parameter takes part in each step's loss)."""
        self.wrap(lambda module: wrap(module, find_unused_parameters=False))

    def wrap(self, wrapper):
        """Route steps through ``wrapper(self.engine)`` (e.g. ``DistributedDataParallel``)
        and return the wrapped module. The teacher is not part of it."""
        self.runner = wrapper(self.engine)
        return self.runner

    def shuffle_matrices(self, step, batch_size):
        """This process's ``(B, 1+N, 1+N)`` ID permutations, drawn for the global batch."""
        return global_batch_shuffle(self.seed, step, self.rank, self.world_size, batch_size,
                                    self.model.max_obj_num, self.device)

    def step(self, batch, step=0):
        """One distillation step on a collated batch (see :func:`clip_from_batch`)."""
        frames, ref_mask, obj_nums = clip_from_batch(batch, self.device)
        shuffle = None
        if self.settings.id_shuffle and self.engine.training:
            shuffle = self.shuffle_matrices(step, len(obj_nums))
        loss, logs = self.runner(frames, ref_mask, obj_nums, step, id_shuffle_matrix=shuffle)
        logs = dict(logs)
        logs['loss'] = logs['kd_loss']
        logs['obj_num'] = torch.tensor(obj_nums, dtype=torch.float32).mean()
        return loss, logs

    __call__ = step

    def step_clip(self, frames, ref_mask, obj_nums, step=0, return_frames=False,
                  id_shuffle_matrix=None):
        """One step on an already assembled clip (:meth:`DistillationEngine.forward`)."""
        return self.runner(frames, ref_mask, obj_nums, step, return_frames=return_frames,
                           id_shuffle_matrix=id_shuffle_matrix)


def build_distiller(cfg, student_model, device=None, rank=0, world_size=1, seed=0):
    """Build the teacher named by ``cfg.KD_TEACHER`` / ``KD_TEACHER_CKPT`` and the distiller.

    The teacher goes to ``device`` (default: the student's device). Raises the errors of
    :func:`kd_settings` and :func:`kd.teacher.build_teacher` (missing checkpoint, ...).
    """
    s = kd_settings(cfg)
    if device is None:
        device = next(student_model.parameters()).device
    teacher = build_teacher(s.teacher, s.teacher_ckpt, device=device, layer=s.teacher_layer,
                            tensor=s.att_tensor, capture=s.uses_attention,
                            long_term_mem_gap=s.teacher_mem_gap, seed=s.teacher_seed)
    logger.info('distillation: teacher %s (%s), GPM %d -> student GPM %d, lambda %s, '
                'attention loss %s on %s, memory labels from the %s', s.teacher, s.teacher_ckpt,
                s.teacher_layer, s.student_layer, s.lambda_att, s.att_loss, s.att_tensor,
                s.memory_labels)
    return Distiller(student_model, teacher, cfg, rank=rank, world_size=world_size, seed=seed)


@register_step_builder('kd')
def build_step(trainer):
    """The step of ``TRAIN_KD`` configs (registered under ``'kd'``, see
    ``networks/managers/train_step.py``)."""
    return build_distiller(trainer.cfg, trainer.model, device=trainer.device, rank=trainer.rank,
                           world_size=trainer.world_size, seed=trainer.seed)
