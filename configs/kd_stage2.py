"""Stage ``kd_stage2``: distillation on YouTube-VOS + DAVIS 2017 clips (the paper's second
stage, 130k steps), starting from the stage-1 student's EMA checkpoint. Same ``KD_*``
switches as ``kd_stage1``; no ground truth is used beyond the reference-frame mask.
"""
import os

from .kd_stage1 import DEFAULT_MODEL
from .kd_stage1 import EngineConfig as _KDStage1

STAGE1_STEPS = 100000


class EngineConfig(_KDStage1):
    def __init__(self, exp_name='default', model=DEFAULT_MODEL):
        super().__init__(exp_name, model)
        self.STAGE_NAME = 'KD_STAGE2'
        self.DATASETS = ['youtubevos', 'davis2017']
        self.DATA_DYNAMIC_MERGE_PROB = 0.3
        self.TRAIN_TOTAL_STEPS = 130000
        # Optimiser as upstream's main (video) stage: the DefaultEngineConfig values.
        self.TRAIN_LR = 2e-4
        self.TRAIN_LR_MIN = 2e-5 if 'mobilenetv2' in self.MODEL_ENCODER else 1e-5
        self.TRAIN_WEIGHT_DECAY = 0.07
        self.PRETRAIN_FULL = True
        self.PRETRAIN_MODEL = self._kd_stage1_ema_checkpoint(exp_name)
        self.init_dir()

    def _kd_stage1_ema_checkpoint(self, exp_name, step=STAGE1_STEPS):
        """The stage-1 student's EMA checkpoint. ``--exp_name kd_stage2`` runs are paired
        with ``--exp_name kd_stage1`` runs; any other name shares its folder across stages."""
        stage1_exp = 'kd_stage1' if exp_name == 'kd_stage2' else exp_name
        return os.path.join(self.DIR_ROOT, 'result', f'{stage1_exp}_{self.MODEL_NAME}',
                            'KD_STAGE1', 'ema_ckpt', f'save_step_{step}.pth')
