"""Model id ``deaotb_gda``: ``deaotb`` with Gated Deformable Attention as the long-term
attention of every GPM layer (the distillation students). Vanilla ``deaotb`` checkpoints
load with only the offset networks new."""
from .deaotb import ModelConfig as _Base


class ModelConfig(_Base):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'DeAOTB_GDA'
        self.MODEL_LT_ATTENTION = 'deformable'
