"""Model id ``deaots_gda``: ``deaots`` with Gated Deformable Attention as the long-term
attention of every GPM layer (the distillation students). Vanilla ``deaots`` checkpoints
load with only the offset networks new."""
from .deaots import ModelConfig as _Base


class ModelConfig(_Base):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'DeAOTS_GDA'
        self.MODEL_LT_ATTENTION = 'deformable'
