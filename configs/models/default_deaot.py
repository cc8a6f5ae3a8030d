"""DeAOT model defaults (upstream ``configs/models/default_deaot.py``), plus the
Gated Deformable Attention switches of this project."""
from .default import DefaultModelConfig as _AOTDefault


class DefaultModelConfig(_AOTDefault):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'DeAOTDefault'
        self.MODEL_VOS = 'deaot'
        self.MODEL_ENGINE = 'deaotengine'
        self.MODEL_DECODER_INTERMEDIATE_LSTT = False
        self.MODEL_SELF_HEADS = 1
        self.MODEL_ATT_HEADS = 1
        self.TRAIN_AUG_TYPE = 'v2'

        # Long-term attention of every GPM layer: 'vanilla' (DeAOT's gated attention)
        # or 'deformable' (Gated Deformable Attention, see networks/layers/deformable.py).
        self.MODEL_LT_ATTENTION = 'vanilla'
        self.MODEL_GDA_GRID = 2            # g: stride of the reference grid
        self.MODEL_GDA_GROUPS = 2          # S: offset groups over the 128-d query
        self.MODEL_GDA_KERNEL = 5          # depthwise kernel of the offset network
        self.MODEL_GDA_OFFSET_SCALE = 2.0  # s: offset = s*tanh(o)/W_g normalised (<= s/2 key cells)
        self.MODEL_GDA_NO_OFFSET = False   # ablation: sample on the fixed grid only


ModelConfig = DefaultModelConfig
