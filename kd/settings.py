"""The ``KD_*`` settings of a distillation run: defaults, validation, command-line flags.

:func:`kd_settings` reads and checks the fields of a config (declared with their
defaults, ``KD_DEFAULTS``, in ``configs/default.py``); :func:`add_kd_arguments` / :func:`apply_kd_arguments` are the
``tools/train.py`` switches that set them. docs/distillation.md lists them.
"""
import argparse
from dataclasses import dataclass

from configs.default import KD_DEFAULTS

from .teacher import ATTENTION_TENSORS, RANDOM_TEACHER

__all__ = ['ATTENTION_LOSSES', 'MEMORY_LABELS', 'KD_DEFAULTS', 'KDSettings', 'kd_settings',
           'is_kd_config', 'add_kd_arguments', 'apply_kd_arguments']

ATTENTION_LOSSES = ('cka', 'kl', 'none')
MEMORY_LABELS = ('teacher', 'student')



@dataclass(frozen=True)
class KDSettings:
    """Validated ``KD_*`` fields (see :data:`KD_DEFAULTS`)."""
    teacher: str
    teacher_ckpt: str
    teacher_layer: int
    teacher_mem_gap: object
    teacher_seed: int
    student_layer: int
    lambda_att: float
    att_loss: str
    att_tensor: str
    inter_weight: float
    intra_weight: float
    inter_min_channels: int
    memory_labels: str
    id_shuffle: bool

    @property
    def uses_attention(self):
        return self.att_loss != 'none' and self.lambda_att != 0.0


def is_kd_config(cfg):
    """Whether a config asks for distillation (``TRAIN_KD``)."""
    return bool(cfg.TRAIN_KD)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def kd_settings(cfg):
    """Read and validate the ``KD_*`` fields of ``cfg``.

    Raises ``ValueError`` naming the field for a bad value, and for the combinations that
    cannot work: the ``'kl'`` attention loss needs softmax maps over the same keys, so it
    requires ``KD_ATT_TENSOR='attn'`` and a vanilla (not deformable) student.
    """
    get = {k: getattr(cfg, k) for k in KD_DEFAULTS}
    try:
        lam = float(get['KD_LAMBDA'])
    except (TypeError, ValueError):
        lam = float('nan')
    if not lam >= 0.0:
        raise ValueError(f'KD_LAMBDA must be a number >= 0, got {get["KD_LAMBDA"]!r}')
    if get['KD_ATT_LOSS'] not in ATTENTION_LOSSES:
        raise ValueError(f'KD_ATT_LOSS must be one of {ATTENTION_LOSSES}, '
                         f'got {get["KD_ATT_LOSS"]!r}')
    if get['KD_ATT_TENSOR'] not in ATTENTION_TENSORS:
        raise ValueError(f'KD_ATT_TENSOR must be one of {ATTENTION_TENSORS}, '
                         f'got {get["KD_ATT_TENSOR"]!r}')
    if get['KD_MEMORY_LABELS'] not in MEMORY_LABELS:
        raise ValueError(f'KD_MEMORY_LABELS must be one of {MEMORY_LABELS}, '
                         f'got {get["KD_MEMORY_LABELS"]!r}')
    for name in ('KD_TEACHER_LAYER', 'KD_STUDENT_LAYER'):
        if not _is_int(get[name]) or get[name] < 1:
            raise ValueError(f'{name} must be a 1-based GPM index (1, 2, 3...), '
                             f'got {get[name]!r}')
    gap = get['KD_TEACHER_MEM_GAP']
    if gap is not None and (not _is_int(gap) or gap < 1):
        raise ValueError(f'KD_TEACHER_MEM_GAP must be None or an int >= 1, got {gap!r}')
    settings = KDSettings(
        teacher=get['KD_TEACHER'], teacher_ckpt=get['KD_TEACHER_CKPT'],
        teacher_layer=get['KD_TEACHER_LAYER'], teacher_mem_gap=gap,
        teacher_seed=int(get['KD_TEACHER_SEED']), student_layer=get['KD_STUDENT_LAYER'],
        lambda_att=lam, att_loss=get['KD_ATT_LOSS'], att_tensor=get['KD_ATT_TENSOR'],
        inter_weight=float(get['KD_INTER_WEIGHT']), intra_weight=float(get['KD_INTRA_WEIGHT']),
        inter_min_channels=int(get['KD_INTER_MIN_CHANNELS']),
        memory_labels=get['KD_MEMORY_LABELS'], id_shuffle=bool(get['KD_ID_SHUFFLE']))
    if settings.uses_attention and settings.att_loss == 'kl':
        if settings.att_tensor != 'attn':
            raise ValueError("KD_ATT_LOSS='kl' compares softmax attention maps: it needs "
                             f"KD_ATT_TENSOR='attn', got {settings.att_tensor!r}")
        if cfg.MODEL_LT_ATTENTION != 'vanilla':
            raise ValueError(
                "KD_ATT_LOSS='kl' needs the student's and the teacher's attention over the same "
                f"keys, but the student {cfg.MODEL_ID!r} uses "
                f"{cfg.MODEL_LT_ATTENTION!r} long-term attention (sampled keys, a different "
                "key count); use a vanilla student (e.g. deaott instead of deaott_gda) or "
                "KD_ATT_LOSS='cka'")
    return settings


# ------------------------------------------------------------------------------------------
# command line


# flag -> (config field, type, help)
_KD_FLAGS = {
    '--teacher': ('KD_TEACHER', str, 'teacher model id (default r50_deaotl)'),
    '--teacher_ckpt': ('KD_TEACHER_CKPT', str,
                       f"teacher weights; '{RANDOM_TEACHER}' = random teacher (tests only)"),
    '--kd_teacher_layer': ('KD_TEACHER_LAYER', int, 'teacher GPM layer distilled, 1-based'),
    '--kd_student_layer': ('KD_STUDENT_LAYER', int, 'student GPM layer, 1-based'),
    '--kd_lambda': ('KD_LAMBDA', float, 'attention-loss weight (0: DIST only)'),
    '--kd_att_loss': ('KD_ATT_LOSS', str, "attention loss: cka, kl or none"),
    '--kd_att_tensor': ('KD_ATT_TENSOR', str,
                        "attention tensor: id_out (ID-branch output) or attn (softmax map)"),
    '--kd_memory_labels': ('KD_MEMORY_LABELS', str,
                           "student memory labels: teacher (pseudo-labels) or student"),
    '--kd_teacher_mem_gap': ('KD_TEACHER_MEM_GAP', int,
                             "teacher long-term memory gap (default: its config's)"),
}


def add_kd_arguments(parser: argparse.ArgumentParser):
    """Add the distillation flags (all default to ``None`` = keep the config's value).

    ``--student`` names the student model id; it selects the config itself, so the caller
    reads it (``args.student or args.model``) before building the config.
    :func:`apply_kd_arguments` copies the other flags onto the config.
    """
    group = parser.add_argument_group('distillation (kd_stage1 / kd_stage2)')
    group.add_argument('--student', type=str, default=None,
                       help='student model id, same as --model (e.g. deaott_gda, deaott)')
    for flag, (_, typ, help_text) in _KD_FLAGS.items():
        kwargs = dict(type=typ, default=None, help=help_text)
        if flag == '--kd_att_loss':
            kwargs['choices'] = ATTENTION_LOSSES
        elif flag == '--kd_att_tensor':
            kwargs['choices'] = ATTENTION_TENSORS
        elif flag == '--kd_memory_labels':
            kwargs['choices'] = MEMORY_LABELS
        group.add_argument(flag, **kwargs)
    return parser


def apply_kd_arguments(cfg, args):
    """Copy the distillation flags that were given onto ``cfg`` and validate the result."""
    for flag, (field, _, _) in _KD_FLAGS.items():
        value = getattr(args, flag.lstrip('-'), None)
        if value is not None:
            setattr(cfg, field, value)
    if is_kd_config(cfg):
        kd_settings(cfg)
    return cfg
