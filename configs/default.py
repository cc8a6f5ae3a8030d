"""Engine, training and test configuration (upstream ``configs/default.py``).

``DefaultEngineConfig(exp_name, model)`` merges the model config of ``model`` (a module
under ``configs/models``) into one flat namespace of UPPER_CASE fields, as upstream does,
so tools written against upstream read the same names.

Unlike upstream, building a config has no side effects: directory fields are plain
paths, and nothing is created until a tool calls :meth:`DefaultEngineConfig.make_dirs`.
Data roots come from ``init_dir(data=...)``, the ``--data_path`` flag of the tools or the
``AOT_DATA_ROOT`` environment variable, never from an author's path.
"""
import importlib
import os

DATA_ROOT_ENV = 'AOT_DATA_ROOT'

# The distillation fields and their defaults (the paper's recipe, docs/distillation.md).
# Every config declares them; only the kd_stage* configs turn TRAIN_KD on. kd/settings.py
# validates them and maps them to tools/train.py flags.
KD_DEFAULTS = {
    'KD_TEACHER': 'r50_deaotl',     # --teacher
    'KD_TEACHER_CKPT': './pretrain_models/R50_DeAOTL_PRE_YTB_DAV.pth',  # --teacher_ckpt
    'KD_TEACHER_LAYER': 3,          # 1-based GPM index of the teacher (Table 4: 1, 2, 3)
    'KD_TEACHER_MEM_GAP': None,     # None: the teacher config's TRAIN_LONG_TERM_MEM_GAP
    'KD_TEACHER_SEED': 0,           # seeds a --teacher_ckpt random teacher (tests)
    'KD_STUDENT_LAYER': 1,          # 1-based GPM index of the student (DeAOT-T has one)
    'KD_LAMBDA': 1.5,               # weight of the attention term; 0 gives DIST alone
    'KD_ATT_LOSS': 'cka',           # 'cka' | 'kl' | 'none'
    'KD_ATT_TENSOR': 'id_out',      # 'id_out' (ID half of the gated output) | 'attn' (softmax)
    'KD_INTER_WEIGHT': 1.0,         # DIST beta
    'KD_INTRA_WEIGHT': 1.0,         # DIST gamma
    'KD_INTER_MIN_CHANNELS': 3,     # samples with fewer valid channels skip L_inter
    'KD_MEMORY_LABELS': 'teacher',  # what the student writes into memory: 'teacher' | 'student'
    'KD_ID_SHUFFLE': True,          # shuffle the student's ID assignment (as upstream training)
}
RESULT_ROOT_ENV = 'AOT_RESULT_ROOT'


def load_model_config(model):
    """Return the ``ModelConfig`` instance of a model id (e.g. ``'deaott'``)."""
    name = model.lower()
    try:
        module = importlib.import_module('configs.models.' + name)
    except ModuleNotFoundError as err:
        if err.name != 'configs.models.' + name:
            raise
        raise ValueError(f"unknown model id {model!r}: no configs/models/{name}.py "
                         f"(known: {', '.join(available_models())})") from None
    return module.ModelConfig()


def available_models():
    folder = os.path.join(os.path.dirname(__file__), 'models')
    return sorted(f[:-3] for f in os.listdir(folder)
                  if f.endswith('.py') and not f.startswith(('_', 'default')))


class DefaultEngineConfig:
    def __init__(self, exp_name='default', model='aott'):
        self.__dict__.update(load_model_config(model).__dict__)
        self.MODEL_ID = model.lower()

        self.EXP_NAME = exp_name + '_' + self.MODEL_NAME
        self.STAGE_NAME = 'YTB'

        # data
        self.DATASETS = ['youtubevos']
        self.DATA_WORKERS = 8
        self.DATA_RANDOMCROP = (465, 465) if self.MODEL_ALIGN_CORNERS else (464, 464)
        self.DATA_RANDOMFLIP = 0.5
        self.DATA_MAX_CROP_STEPS = 5  # upstream says 10 but never reads it; 5 is what runs
        self.DATA_SHORT_EDGE_LEN = 480
        self.DATA_MIN_SCALE_FACTOR = 0.7
        self.DATA_MAX_SCALE_FACTOR = 1.3
        self.DATA_RANDOM_REVERSE_SEQ = True
        self.DATA_SEQ_LEN = 5
        self.DATA_DAVIS_REPEAT = 5
        self.DATA_RANDOM_GAP_DAVIS = 12
        self.DATA_RANDOM_GAP_YTB = 3
        self.DATA_DYNAMIC_MERGE_PROB = 0.3
        # Video clips read only their reference (first-frame) mask: no merging, no clip
        # rejection by later masks. On for the distillation stages.
        self.DATA_LABEL_FREE = False

        # initialisation
        self.PRETRAIN = True
        self.PRETRAIN_FULL = False
        self.PRETRAIN_MODEL = ''

        # optimisation
        self.TRAIN_TOTAL_STEPS = 100000
        self.TRAIN_START_STEP = 0
        self.TRAIN_WEIGHT_DECAY = 0.07
        self.TRAIN_WEIGHT_DECAY_EXCLUSIVE = {}
        self.TRAIN_WEIGHT_DECAY_EXEMPTION = [
            'absolute_pos_embed', 'relative_position_bias_table', 'relative_emb_v', 'conv_out']
        self.TRAIN_LR = 2e-4
        self.TRAIN_LR_MIN = 2e-5 if 'mobilenetv2' in self.MODEL_ENCODER else 1e-5
        self.TRAIN_LR_POWER = 0.9
        self.TRAIN_LR_ENCODER_RATIO = 0.1
        self.TRAIN_LR_WARM_UP_RATIO = 0.05
        self.TRAIN_LR_COSINE_DECAY = False
        self.TRAIN_LR_RESTART = 1
        self.TRAIN_LR_UPDATE_STEP = 1
        self.TRAIN_AUX_LOSS_WEIGHT = 1.0
        self.TRAIN_AUX_LOSS_RATIO = 1.0
        self.TRAIN_OPT = 'adamw'
        self.TRAIN_SGD_MOMENTUM = 0.9
        self.TRAIN_GPUS = 4
        self.TRAIN_BATCH_SIZE = 16  # global batch over all processes
        self.TRAIN_TBLOG = False
        self.TRAIN_TBLOG_STEP = 50
        self.TRAIN_LOG_STEP = 20
        self.TRAIN_IMG_LOG = True
        self.TRAIN_TOP_K_PERCENT_PIXELS = 0.15
        self.TRAIN_SEQ_TRAINING_FREEZE_PARAMS = ['patch_wise_id_bank']
        self.TRAIN_SEQ_TRAINING_START_RATIO = 0.5
        self.TRAIN_HARD_MINING_RATIO = 0.5
        self.TRAIN_EMA_RATIO = 0.1
        self.TRAIN_CLIP_GRAD_NORM = 5.0
        self.TRAIN_SAVE_STEP = 5000
        self.TRAIN_MAX_KEEP_CKPT = 8
        self.TRAIN_RESUME = False
        self.TRAIN_RESUME_CKPT = None
        self.TRAIN_RESUME_STEP = 0
        self.TRAIN_AUTO_RESUME = True
        self.TRAIN_DATASET_FULL_RESOLUTION = False
        self.TRAIN_ENABLE_PREV_FRAME = False
        self.TRAIN_ENCODER_FREEZE_AT = 2
        self.TRAIN_LSTT_EMB_DROPOUT = 0.0
        self.TRAIN_LSTT_ID_DROPOUT = 0.0
        self.TRAIN_LSTT_DROPPATH = 0.1
        self.TRAIN_LSTT_DROPPATH_SCALING = False
        self.TRAIN_LSTT_DROPPATH_LST = False
        self.TRAIN_LSTT_LT_DROPOUT = 0.0
        self.TRAIN_LSTT_ST_DROPOUT = 0.0

        # test
        self.TEST_GPU_ID = 0
        self.TEST_GPU_NUM = 1
        self.TEST_FRAME_LOG = False
        self.TEST_DATASET = 'youtubevos'
        self.TEST_DATASET_FULL_RESOLUTION = False
        self.TEST_DATASET_SPLIT = 'val'
        self.TEST_CKPT_PATH = None
        self.TEST_CKPT_STEP = None  # None: the latest checkpoint in DIR_CKPT
        self.TEST_FLIP = False
        self.TEST_MULTISCALE = [1]
        self.TEST_MAX_SHORT_EDGE = None
        self.TEST_MAX_LONG_EDGE = 800 * 1.3
        self.TEST_WORKERS = 4
        self.TEST_EMA = False
        # Encoder in channels-last layout (AOT.set_channels_last): None = on the CPU only,
        # where oneDNN's convolutions are faster in it; same values to float rounding.
        self.TEST_CHANNELS_LAST = None

        # distillation (off: supervised stages; configs/kd_stage*.py turn it on)
        self.TRAIN_KD = False
        self.__dict__.update(KD_DEFAULTS)

        # distributed
        self.DIST_ENABLE = True
        self.DIST_BACKEND = 'nccl'
        self.DIST_URL = 'tcp://127.0.0.1:13241'
        self.DIST_START_GPU = 0

        self.init_dir()

    def init_dir(self, data=None, root=None):
        """Set the DIR_* fields (pure: creates nothing; see :meth:`make_dirs`)."""
        if data is None:
            data = getattr(self, 'DIR_DATA', None) or os.environ.get(DATA_ROOT_ENV, './datasets')
        if root is None:
            root = getattr(self, 'DIR_ROOT', None) or os.environ.get(RESULT_ROOT_ENV, './')
        self.DIR_DATA = data
        self.DIR_DAVIS = os.path.join(data, 'DAVIS')
        self.DIR_YTB = os.path.join(data, 'YTB')
        self.DIR_STATIC = os.path.join(data, 'Static')
        self.DIR_ROOT = root
        self.DIR_RESULT = os.path.join(root, 'result', self.EXP_NAME, self.STAGE_NAME)
        self.DIR_CKPT = os.path.join(self.DIR_RESULT, 'ckpt')
        self.DIR_EMA_CKPT = os.path.join(self.DIR_RESULT, 'ema_ckpt')
        self.DIR_LOG = os.path.join(self.DIR_RESULT, 'log')
        self.DIR_TB_LOG = os.path.join(self.DIR_RESULT, 'log', 'tensorboard')
        self.DIR_IMG_LOG = os.path.join(self.DIR_RESULT, 'log', 'img')
        self.DIR_EVALUATION = os.path.join(root, 'results')

    def _pre_ema_checkpoint(self, step=100000):
        """Path of the PRE stage's EMA checkpoint that the main stages start from."""
        import os.path as osp
        return osp.join(self.DIR_ROOT, 'result', self.EXP_NAME, 'PRE', 'ema_ckpt',
                        f'save_step_{step}.pth')

    def make_dirs(self, *fields):
        """Create the directories named by ``fields`` (default: the training ones)."""
        fields = fields or ('DIR_RESULT', 'DIR_CKPT', 'DIR_EMA_CKPT', 'DIR_LOG', 'DIR_TB_LOG',
                            'DIR_IMG_LOG')
        for field in fields:
            os.makedirs(getattr(self, field), exist_ok=True)

    def __repr__(self):
        items = ', '.join(f'{k}={v!r}' for k, v in sorted(self.__dict__.items()))
        return f'{type(self).__name__}({items})'


def build_config(stage='pre', exp_name='default', model='aott'):
    """Build the ``EngineConfig`` of a stage module (``configs/<stage>.py``)."""
    try:
        module = importlib.import_module('configs.' + stage)
    except ModuleNotFoundError as err:
        if err.name != 'configs.' + stage:
            raise
        raise ValueError(f'unknown stage {stage!r}: no configs/{stage}.py') from None
    return module.EngineConfig(exp_name, model)
