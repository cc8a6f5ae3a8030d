"""AOT model defaults (upstream ``configs/models/default.py`` field names and values).

Every model id in this folder defines ``ModelConfig``; the engine config copies its
upper-case attributes into one flat namespace, as upstream does, so scripts that read
``cfg.MODEL_*`` keep working.
"""


class DefaultModelConfig:
    def __init__(self):
        self.MODEL_NAME = 'AOTDefault'

        self.MODEL_VOS = 'aot'
        self.MODEL_ENGINE = 'aotengine'
        self.MODEL_ALIGN_CORNERS = True
        self.MODEL_ENCODER = 'mobilenetv2'
        self.MODEL_ENCODER_PRETRAIN = './pretrain_models/mobilenet_v2-b0353104.pth'
        self.MODEL_ENCODER_DIM = [24, 32, 96, 1280]  # 4x, 8x, 16x, 16x (last)
        self.MODEL_ENCODER_EMBEDDING_DIM = 256
        self.MODEL_DECODER_INTERMEDIATE_LSTT = True
        self.MODEL_FREEZE_BN = True
        self.MODEL_FREEZE_BACKBONE = False
        self.MODEL_MAX_OBJ_NUM = 10
        self.MODEL_SELF_HEADS = 8
        self.MODEL_ATT_HEADS = 8
        self.MODEL_LSTT_NUM = 1
        self.MODEL_EPSILON = 1e-5  # kept for compatibility; unused
        self.MODEL_USE_PREV_PROB = False
        # Ours: long-term attention of the propagation layers, 'vanilla' (upstream) or
        # 'deformable' (GDA; DeAOT models only, see default_deaot.py).
        self.MODEL_LT_ATTENTION = 'vanilla'

        self.TRAIN_LONG_TERM_MEM_GAP = 9999
        self.TRAIN_AUG_TYPE = 'v1'

        self.TEST_LONG_TERM_MEM_GAP = 9999
        self.TEST_SHORT_TERM_MEM_SKIP = 1
        # Ours: cap on stored long-term frames (None = unbounded, upstream behaviour).
        # Reference frames (where masks were given) are always kept.
        self.TEST_LONG_TERM_MEM_MAX = None


ModelConfig = DefaultModelConfig
