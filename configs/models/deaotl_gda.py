"""Model id ``deaotl_gda``: ``deaotl`` with Gated Deformable Attention as the long-term
attention of every GPM layer (the distillation students). Vanilla ``deaotl`` checkpoints
load with only the offset networks new."""
from .deaotl import ModelConfig as _Base


class ModelConfig(_Base):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'DeAOTL_GDA'
        self.MODEL_LT_ATTENTION = 'deformable'
