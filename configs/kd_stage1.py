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

        # Distillation (docs/distillation.md; flags in kd.distiller.add_kd_arguments).
        self.TRAIN_KD = True
        self.KD_TEACHER = 'r50_deaotl'                 # --teacher
        self.KD_TEACHER_CKPT = './pretrain_models/R50_DeAOTL_PRE_YTB_DAV.pth'  # --teacher_ckpt
        self.KD_TEACHER_LAYER = 3       # teacher GPM distilled, 1-based (--kd_teacher_layer)
        self.KD_TEACHER_MEM_GAP = None  # None: the teacher's TRAIN_LONG_TERM_MEM_GAP
        self.KD_TEACHER_SEED = 0        # seeds a '--teacher_ckpt random' teacher (tests)
        self.KD_STUDENT_LAYER = 1       # student GPM, 1-based (--kd_student_layer)
        self.KD_LAMBDA = 1.5            # attention-term weight; 0 = DIST only (--kd_lambda)
        self.KD_ATT_LOSS = 'cka'        # 'cka' | 'kl' | 'none' (--kd_att_loss)
        self.KD_ATT_TENSOR = 'id_out'   # 'id_out' | 'attn' (--kd_att_tensor)
        self.KD_INTER_WEIGHT = 1.0      # DIST beta
        self.KD_INTRA_WEIGHT = 1.0      # DIST gamma
        self.KD_INTER_MIN_CHANNELS = 3  # single-object samples skip the inter term
        self.KD_MEMORY_LABELS = 'teacher'  # 'teacher' | 'student' (--kd_memory_labels)
        self.KD_ID_SHUFFLE = True       # the student shuffles IDs, as upstream training

        self.init_dir()
