"""Stage ``pre_ytb_dav``: YouTube-VOS + DAVIS 2017, from the PRE EMA checkpoint (the released main models)."""
from .default import DefaultEngineConfig


class EngineConfig(DefaultEngineConfig):
    def __init__(self, exp_name='default', model='aott'):
        super().__init__(exp_name, model)
        self.STAGE_NAME = 'PRE_YTB_DAV'
        self.DATASETS = ['youtubevos', 'davis2017']
        self.PRETRAIN_FULL = True
        self.PRETRAIN_MODEL = self._pre_ema_checkpoint()
        self.init_dir()
