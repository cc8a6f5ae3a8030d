"""Stage ``kd_stage1``: distil a frozen teacher into a GDA student on synthetic clips made
from static images (the paper's first stage, 100k steps). No ground truth is used beyond
each clip's reference-frame mask; see ``kd/`` and ``docs/distillation.md``.

The student is the config's model (default ``deaott_gda``; ``deaott`` gives the vanilla-
attention ablation). The ``KD_*`` fields are the distillation switches.
"""
from .default import DefaultEngineConfig

# The student when no --model / --student is given.
DEFAULT_MODEL = 'deaott_gda'


class EngineConfig(DefaultEngineConfig):
    def __init__(self, exp_name='default', model=DEFAULT_MODEL):
        super().__init__(exp_name, model)
        self.STAGE_NAME = 'KD_STAGE1'
        self.DATASETS = ['static']
        self.DATA_DYNAMIC_MERGE_PROB = 1.0
        # No label beyond each clip's reference mask (video clips; see build_train_dataset).
        self.DATA_LABEL_FREE = True
        self.TRAIN_TOTAL_STEPS = 100000
        # Optimiser as upstream's static pre-training stage (pre.py).
        self.TRAIN_LR = 4e-4
        self.TRAIN_LR_MIN = 2e-5
        self.TRAIN_WEIGHT_DECAY = 0.03
        # The supervised sequential phase does not apply: what the student writes into
        # memory is chosen by KD_MEMORY_LABELS.
        self.TRAIN_SEQ_TRAINING_START_RATIO = 1.0
        # The student starts from an ImageNet encoder, not from a supervised VOS checkpoint.
        self.PRETRAIN = True
        self.PRETRAIN_FULL = False
        self.PRETRAIN_MODEL = ''

        # Distillation: the KD_* fields keep configs/default.py's KD_DEFAULTS (the paper's
        # recipe, docs/distillation.md); tools/train.py's --teacher / --kd_* flags set them.
        self.TRAIN_KD = True

        self.init_dir()
