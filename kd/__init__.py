"""Distillation of a frozen teacher into a small student without ground truth.

``kd.losses`` holds the losses; the teacher wrapper and the trainer step live in their own modules.
"""
from .distiller import (KD_DEFAULTS, DistillationEngine, Distiller, add_kd_arguments,
                        apply_kd_arguments, build_distiller, build_step, clip_from_batch,
                        is_kd_config, kd_settings)
from .losses import (DistillationLoss, attention_cka_loss, attention_kl_loss,
                     inter_relation_loss, intra_relation_loss, linear_cka, valid_channels)
from .teacher import RANDOM_TEACHER, Teacher, TeacherFrame, build_teacher

__all__ = [
    'KD_DEFAULTS', 'DistillationEngine', 'Distiller', 'add_kd_arguments', 'apply_kd_arguments',
    'build_distiller', 'build_step', 'clip_from_batch', 'is_kd_config', 'kd_settings',
    'DistillationLoss', 'attention_cka_loss', 'attention_kl_loss', 'inter_relation_loss',
    'intra_relation_loss', 'linear_cka', 'valid_channels',
    'RANDOM_TEACHER', 'Teacher', 'TeacherFrame', 'build_teacher',
]
