"""Train AOT / DeAOT models (upstream ``tools/train.py``, same flags plus a few).

From the repository root::

    # upstream's recipe: 4 GPUs, AMP
    python tools/train.py --stage pre --model deaott --gpu_num 4 --amp --data_path ./datasets
    python tools/train.py --stage pre_ytb_dav --model deaott --gpu_num 4 --amp

    # one GPU, bf16; or a small CPU run (2 processes, gloo)
    python tools/train.py --stage ytb --model deaott --gpu_num 1 --amp --amp_dtype bf16
    python tools/train.py --stage pre_dav --model deaott --device cpu --gpu_num 2 \\
        --batch_size 2 --no_pretrain --set DATA_RANDOMCROP=97,97

    # several machines (env:// rendezvous), e.g. 2 nodes x 4 GPUs; the result folder must be
    # on a shared file system for resuming
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        tools/train.py --stage pre_ytb_dav --model deaott --amp

Flags as upstream: ``--exp_name --stage --model --max_id_num --start_gpu --gpu_num --batch_size
--dist_url --amp --pretrained_path --datasets --lr --total_step --start_step``. ``--batch_size``
is the *global* batch (split over the processes), as upstream. The default ``--exp_name`` is
``default`` (upstream's empty default did not match eval's ``default``).

Ours: ``--data_path`` (dataset root: ``DAVIS/``, ``YTB/``, ``Static/`` under it), ``--device
cpu|cuda``, ``--workers``, ``--amp_dtype fp16|bf16``, ``--resume_step N`` (instead of the latest
checkpoint), ``--save_step``, ``--log_step``, ``--seed``, ``--stop_step N`` (stop after step N
with a checkpoint; the same command later resumes there), ``--no_pretrain`` (random initial
weights), ``--no_progress`` and ``--set KEY=VALUE ...`` (any existing config field, e.g.
``--set DATA_RANDOMCROP=161,161 TRAIN_LSTT_DROPPATH=0``).

Distillation hook: ``--stage kd_stage1`` selects ``configs/kd_stage1.py``; so does ``--exp_name
kd_stage1`` (or ``kd_stage2``) when ``--stage`` is not given and that config exists. Such a config
either defines ``build_step(trainer)`` in its module or sets ``TRAIN_KD = True`` (then
``kd.distiller.build_step``, registered when ``kd`` is imported, provides the step); see
``networks/managers/train_step.py``. Without ``--model``, a stage module's ``DEFAULT_MODEL``
(e.g. the KD student) is used, else ``aott``. The distillation flags (``--student``,
``--teacher``, ``--kd_*``) are added here (``add_kd_arguments``) and copied onto the config
(``apply_kd_arguments``) before ``--set`` is applied.
"""
import argparse
import ast
import os
import random
import socket
import sys

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Importing kd also registers its training step for TRAIN_KD configs (also in spawned processes).
from kd.distiller import add_kd_arguments, apply_kd_arguments  # noqa: E402
from utils.cli import GIVEN, NON_NEGATIVE, POSITIVE, apply_flags  # noqa: E402

KD_STAGES = ('kd_stage1', 'kd_stage2')
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')


def build_parser():
    p = argparse.ArgumentParser(description='Train a VOS model (AOT / DeAOT).')
    # upstream's flags
    p.add_argument('--exp_name', type=str, default='default')
    p.add_argument('--stage', type=str, default=None,
                   help="stage config in configs/ (default 'pre'; see the kd_stage note)")
    p.add_argument('--model', type=str, default=None,
                   help="model id (default 'aott', or the stage config's DEFAULT_MODEL)")
    p.add_argument('--max_id_num', type=int, default=-1)
    p.add_argument('--start_gpu', type=int, default=0)
    p.add_argument('--gpu_num', type=int, default=-1,
                   help='processes on this machine (GPUs, or CPU processes with --device cpu)')
    p.add_argument('--batch_size', type=int, default=-1, help='global batch size')
    p.add_argument('--dist_url', type=str, default='')
    p.add_argument('--amp', action='store_true')
    p.add_argument('--pretrained_path', type=str, default='')
    p.add_argument('--datasets', nargs='+', type=str, default=[])
    p.add_argument('--lr', type=float, default=-1.)
    p.add_argument('--total_step', type=int, default=-1)
    p.add_argument('--start_step', type=int, default=-1)
    # ours
    p.add_argument('--data_path', type=str, default='',
                   help='dataset root holding DAVIS/, YTB/, Static/')
    p.add_argument('--device', type=str, default=None, choices=['cpu', 'cuda'],
                   help='default: cuda when available')
    p.add_argument('--workers', type=int, default=-1, help='DataLoader workers per process')
    p.add_argument('--amp_dtype', type=str, default='fp16', choices=['fp16', 'bf16'])
    p.add_argument('--resume_step', type=int, default=-1,
                   help='resume from save_step_N.pth instead of the latest checkpoint')
    p.add_argument('--save_step', type=int, default=-1)
    p.add_argument('--log_step', type=int, default=-1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--stop_step', type=int, default=-1,
                   help='stop after this step (saving a checkpoint) without changing the schedule')
    p.add_argument('--no_pretrain', action='store_true',
                   help='start from random weights (no ImageNet / VOS initialisation)')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                   help='override config fields (Python literals; e.g. DATA_RANDOMCROP=161,161)')
    add_kd_arguments(p)  # --student, --teacher, --teacher_ckpt, --kd_*
    return p


def resolve_stage(args):
    if args.stage:
        return args.stage
    if args.exp_name in KD_STAGES:
        import importlib.util
        if importlib.util.find_spec('configs.' + args.exp_name) is not None:
            return args.exp_name
    return 'pre'


def apply_overrides(cfg, items):
    """``KEY=VALUE`` strings -> config fields; the field must exist (typos are errors)."""
    for item in items:
        key, sep, text = item.partition('=')
        key = key.strip()
        if not sep or not key:
            raise ValueError(f'--set expects KEY=VALUE, got {item!r}')
        if not hasattr(cfg, key):
            raise ValueError(f'--set {key}: the config has no field {key!r}')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string
        setattr(cfg, key, value)
    if any(item.partition('=')[0].strip() in ('DIR_DATA', 'DIR_ROOT') for item in items):
        cfg.init_dir(data=cfg.DIR_DATA, root=cfg.DIR_ROOT)  # re-derive the other DIR_* fields


def resolve_model(args, stage):
    model = getattr(args, 'student', None) or args.model
    if model:
        return model
    import importlib
    return getattr(importlib.import_module('configs.' + stage), 'DEFAULT_MODEL', 'aott')


# flag -> config field (utils/cli.py): each is copied when given.
TRAIN_FLAGS = (
    ('max_id_num', 'MODEL_MAX_OBJ_NUM', POSITIVE),
    ('batch_size', 'TRAIN_BATCH_SIZE', POSITIVE),
    ('pretrained_path', 'PRETRAIN_MODEL', GIVEN),
    ('lr', 'TRAIN_LR', POSITIVE),
    ('total_step', 'TRAIN_TOTAL_STEPS', POSITIVE),
    ('start_step', 'TRAIN_START_STEP', POSITIVE),
    ('resume_step', 'TRAIN_RESUME_STEP', POSITIVE),
    ('save_step', 'TRAIN_SAVE_STEP', POSITIVE),
    ('log_step', 'TRAIN_LOG_STEP', POSITIVE),
    ('workers', 'DATA_WORKERS', NON_NEGATIVE),
)


def build_cfg(args):
    from configs.default import build_config
    stage = resolve_stage(args)
    cfg = build_config(stage, args.exp_name, resolve_model(args, stage))
    if args.data_path:
        cfg.init_dir(data=args.data_path)
    if args.datasets:
        cfg.DATASETS = list(args.datasets)
    cfg.DIST_START_GPU = args.start_gpu
    apply_flags(cfg, args, TRAIN_FLAGS)
    if args.pretrained_path and not cfg.PRETRAIN_FULL:
        print(f'note: --pretrained_path is a whole VOS model, but stage {cfg.STAGE_NAME} '
              f'starts from ImageNet encoder weights (PRETRAIN_FULL=False), as upstream; '
              f'add --set PRETRAIN_FULL=True to start from it', file=sys.stderr)
    if args.resume_step > 0:
        cfg.TRAIN_RESUME = True
        cfg.TRAIN_RESUME_CKPT = args.resume_step
    if args.no_pretrain:
        cfg.PRETRAIN = False
    apply_kd_arguments(cfg, args)
    apply_overrides(cfg, args.set)
    return cfg


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def main_worker(local_rank, cfg, opts, rank=None, local_world=1):
    """Body of one training process (``mp.spawn`` passes ``local_rank`` first)."""
    from networks.managers.trainer import Trainer
    rank = local_rank if rank is None else rank
    if opts['device'] == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:
        # Processes on one machine share its cores; oversubscribing them is much slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    seed_everything(opts['seed'] + rank)
    trainer = Trainer(rank, cfg, device=opts['device'], local_rank=local_rank,
                      enable_amp=opts['amp'], amp_dtype=opts['amp_dtype'], seed=opts['seed'],
                      workers=cfg.DATA_WORKERS, progress=opts['progress'],
                      pretrain=cfg.PRETRAIN)
    try:
        trainer.sequential_training(stop_step=opts['stop_step'])
    finally:
        trainer.close()


def main(argv=None):
    from networks.managers.trainer import TrainDataError
    try:
        _main(argv)
    except TrainDataError as err:  # a bad dataset: one line, no traceback, no folders made
        raise SystemExit(f'train: error: {err}') from None


def _main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = build_cfg(args)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    opts = dict(device=device, amp=args.amp, amp_dtype=args.amp_dtype, seed=args.seed,
                stop_step=args.stop_step if args.stop_step > 0 else None,
                progress=not args.no_progress)

    if all(k in os.environ for k in TORCHRUN_ENV):
        # Launched by torchrun (one process per device, possibly on several machines).
        world = int(os.environ['WORLD_SIZE'])
        cfg.TRAIN_GPUS = world
        cfg.DIST_URL = 'env://'
        _check_batch(cfg)
        main_worker(int(os.environ['LOCAL_RANK']), cfg, opts, rank=int(os.environ['RANK']),
                    local_world=int(os.environ.get('LOCAL_WORLD_SIZE', world)))
        return

    if args.gpu_num > 0:
        nprocs = args.gpu_num
    elif device == 'cuda':
        nprocs = max(1, min(cfg.TRAIN_GPUS, torch.cuda.device_count() - args.start_gpu))
    else:
        nprocs = 1
    cfg.TRAIN_GPUS = nprocs
    _check_batch(cfg)
    if nprocs == 1:
        main_worker(0, cfg, opts)
        return
    cfg.DIST_URL = args.dist_url or f'tcp://127.0.0.1:{free_port()}'
    import torch.multiprocessing as mp
    mp.spawn(main_worker, args=(cfg, opts, None, nprocs), nprocs=nprocs, join=True)


def _check_batch(cfg):
    if cfg.TRAIN_BATCH_SIZE % cfg.TRAIN_GPUS:
        raise SystemExit(f'--batch_size {cfg.TRAIN_BATCH_SIZE} (global) is not divisible by the '
                         f'{cfg.TRAIN_GPUS} processes')


if __name__ == '__main__':
    main()
