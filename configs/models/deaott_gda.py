"""Model id ``deaott_gda``: ``deaott`` with Gated Deformable Attention as the long-term
attention of every GPM layer (the distillation students). Vanilla ``deaott`` checkpoints
load with only the offset networks new."""
from .deaott import ModelConfig as _Base


class ModelConfig(_Base):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'DeAOTT_GDA'
        self.MODEL_LT_ATTENTION = 'deformable'
