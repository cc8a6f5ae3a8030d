"""Model id ``r50_deaotl_gda``: ``r50_deaotl`` with Gated Deformable Attention as the long-term
attention of every GPM layer (the distillation students). Vanilla ``r50_deaotl`` checkpoints
load with only the offset networks new."""
from .r50_deaotl import ModelConfig as _Base


class ModelConfig(_Base):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'R50_DeAOTL_GDA'
        self.MODEL_LT_ATTENTION = 'deformable'
