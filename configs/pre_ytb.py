"""Stage ``pre_ytb``: YouTube-VOS, from the PRE EMA checkpoint."""
from .default import DefaultEngineConfig


class EngineConfig(DefaultEngineConfig):
    def __init__(self, exp_name='default', model='aott'):
        super().__init__(exp_name, model)
        self.STAGE_NAME = 'PRE_YTB'
        self.DATASETS = ['youtubevos']
        self.PRETRAIN_FULL = True
        self.PRETRAIN_MODEL = self._pre_ema_checkpoint()
        self.init_dir()
