"""Stage ``pre_dav``: DAVIS 2017, from the PRE EMA checkpoint."""
from .default import DefaultEngineConfig


class EngineConfig(DefaultEngineConfig):
    def __init__(self, exp_name='default', model='aott'):
        super().__init__(exp_name, model)
        self.STAGE_NAME = 'PRE_DAV'
        self.DATASETS = ['davis2017']
        self.TRAIN_TOTAL_STEPS = 50000
        self.PRETRAIN_FULL = True
        self.PRETRAIN_MODEL = self._pre_ema_checkpoint()
        self.init_dir()
