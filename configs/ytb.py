"""Stage ``ytb``: YouTube-VOS from ImageNet encoder weights."""
from .default import DefaultEngineConfig


class EngineConfig(DefaultEngineConfig):
    def __init__(self, exp_name='default', model='aott'):
        super().__init__(exp_name, model)
        self.STAGE_NAME = 'YTB'
        self.DATASETS = ['youtubevos']
        self.init_dir()
