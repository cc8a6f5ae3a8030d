"""Result-folder names and checkpoint choice of an evaluation run (upstream's naming), and
the atomic submission zip."""
import os
import zipfile

from utils.checkpoint import checkpoint_path, latest_checkpoint
from utils.io import atomic_write, file_sha256

__all__ = ['eval_name', 'checkpoint_tag', 'resolve_checkpoint', 'write_zip']


def eval_name(cfg, ckpt):
    """Upstream's result-folder name for this config and checkpoint tag."""
    exp_name = cfg.EXP_NAME
    if 'aost' in cfg.MODEL_VOS:
        exp_name += '_L{}'.format(int(cfg.MODEL_LSTT_NUM))
    name = '{}_{}_{}_{}_ckpt_{}'.format(cfg.TEST_DATASET, cfg.TEST_DATASET_SPLIT, exp_name,
                                        cfg.STAGE_NAME, ckpt)
    if cfg.TEST_EMA:
        name += '_ema'
    if cfg.TEST_FLIP:
        name += '_flip'
    if len(cfg.TEST_MULTISCALE) > 1:
        name += '_ms_' + str(list(cfg.TEST_MULTISCALE)).replace('.', 'dot').replace(
            '[', '').replace(']', '').replace(', ', '_')
    return name


def checkpoint_tag(path):
    """``<stem>_<sha256[:8]>`` of a checkpoint file, safe as part of a folder name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = ''.join(c if c.isalnum() or c in '-.' else '_' for c in stem) or 'ckpt'
    return f'{stem}_{file_sha256(path)[:8]}'


def resolve_checkpoint(cfg):
    """``(path or None, tag)`` of the checkpoint to evaluate, as upstream picks it.

    ``TEST_CKPT_PATH == 'test'``: no checkpoint (random weights), tag ``'test'``. An explicit
    path: tag ``<file stem>_<first 8 hex digits of its SHA-256>`` (upstream: ``'unknown'``, so
    every file shared one folder). Otherwise ``save_step_<TEST_CKPT_STEP>.pth`` (or the latest one)
    in ``DIR_CKPT``, or ``DIR_EMA_CKPT`` with ``TEST_EMA``; the tag is the step.
    """
    path = cfg.TEST_CKPT_PATH
    if path == 'test':
        return None, 'test'
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'checkpoint not found: {path}')
        return path, checkpoint_tag(path)
    folder = cfg.DIR_EMA_CKPT if cfg.TEST_EMA else cfg.DIR_CKPT
    if cfg.TEST_CKPT_STEP is not None:
        step = int(cfg.TEST_CKPT_STEP)
        path = checkpoint_path(folder, step)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'checkpoint not found: {path} (step {step} of {folder})')
        return path, str(step)
    step, path = latest_checkpoint(folder)
    if path is None:
        raise FileNotFoundError(f'no checkpoint save_step_<N>.pth in {folder}; pass --ckpt_path '
                                f'<file>, --ckpt_step N, or --ckpt_path test for random weights')
    return path, str(step)


def write_zip(zip_path, members):
    """Write ``members`` (``[(file path, archive name)]``) into ``zip_path`` atomically."""
    def _write(f):
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_DEFLATED) as zf:
            for src, arcname in members:
                zf.write(src, arcname)
    atomic_write(zip_path, _write)
