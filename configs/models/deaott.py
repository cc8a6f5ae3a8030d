"""Model id ``deaott`` (upstream ``configs/models/deaott.py``)."""
from .default_deaot import DefaultModelConfig


class ModelConfig(DefaultModelConfig):
    def __init__(self):
        super().__init__()
        self.MODEL_NAME = 'DeAOTT'
