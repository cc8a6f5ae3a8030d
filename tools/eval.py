"""Evaluate a VOS model on DAVIS, YouTube-VOS or a custom folder (upstream's ``tools/eval.py``).

Run from the repository root, e.g.::

    python tools/eval.py --exp_name default --stage pre_ytb_dav --model r50_deaotl \\
        --ckpt_path pretrain_models/R50_DeAOTL_PRE_YTB_DAV.pth --dataset davis2017 --split val \\
        --data_path ./datasets --result_path ./results [--flip] [--ms 1.0 1.3] [--amp]

Upstream's flags keep their names, defaults and effects. Added: ``--data_path`` (the folder
holding ``DAVIS/`` and ``YTB/``, or a DAVIS / YouTube-VOS / custom dataset folder itself),
``--result_path`` (default ``./results``), ``--device cpu|cuda`` and ``--workers``.
``--dataset custom`` reads ``<data_path>/{JPEGImages,Annotations}/<seq>/``.

Results go to ``<result_path>/<dataset>/<eval_name>/``; an interrupted run resumes when started
again with the same flags. An explicit ``--ckpt_path`` names the folder after the file (stem and
a short content hash). A folder made with other settings is never reused: the run stops unless
``--overwrite`` (which recomputes every sequence). DAVIS val runs are scored (J&F) at the end.
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks.managers.evaluator import DATASETS, SPLITS  # noqa: E402
from utils.cli import GIVEN, POSITIVE, apply_flags  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description='Evaluate a VOS model (AOT / DeAOT).')
    p.add_argument('--exp_name', type=str, default='default')
    p.add_argument('--stage', type=str, default='pre')
    p.add_argument('--model', type=str, default='aott')
    p.add_argument('--lstt_num', type=int, default=-1)
    p.add_argument('--lt_gap', type=int, default=-1, help='long-term memory gap (frames)')
    p.add_argument('--lt_max', type=int, default=-1,
                   help='cap on long-term memory frames, reference frames kept '
                        '(TEST_LONG_TERM_MEM_MAX; default: unbounded, upstream\'s protocol; '
                        'docs/memory.md)')
    p.add_argument('--st_skip', type=int, default=-1, help='short-term memory skip')
    p.add_argument('--max_id_num', type=int, default=-1)
    p.add_argument('--gpu_id', type=int, default=0)
    p.add_argument('--gpu_num', type=int, default=1,
                   help='processes that split the sequences (one GPU each on CUDA)')
    p.add_argument('--ckpt_path', type=str, default='',
                   help="checkpoint file; 'test' evaluates random weights")
    p.add_argument('--ckpt_step', type=int, default=-1,
                   help='evaluate <result>/ckpt/save_step_<N>.pth (default: the latest)')
    p.add_argument('--dataset', type=str, default='', help=f'one of {", ".join(DATASETS)}')
    p.add_argument('--split', type=str, default='', help=f'one of {", ".join(SPLITS)}')
    p.add_argument('--ema', action='store_true')
    p.add_argument('--flip', action='store_true')
    p.add_argument('--ms', nargs='+', type=float, default=[1.])
    p.add_argument('--max_resolution', type=float, default=480 * 1.3)
    p.add_argument('--amp', action='store_true',
                   help='autocast: bf16 on CPU, fp16 on CUDA (same as --precision bf16 / fp16)')
    p.add_argument('--precision', default='', choices=('', 'fp32', 'bf16', 'fp16'),
                   help='compute dtype (default fp32, exact; bf16 is the CPU fast path, '
                        'docs/benchmark.md); overrides --amp')
    p.add_argument('--data_path', type=str, default='',
                   help='datasets root (holding DAVIS/ and YTB/) or the dataset folder itself')
    p.add_argument('--result_path', type=str, default='',
                   help='results root (default ./results)')
    p.add_argument('--device', type=str, default='', choices=('', 'cpu', 'cuda'),
                   help='default: cuda when available')
    p.add_argument('--workers', type=int, default=-1,
                   help='data-loading processes (default: TEST_WORKERS)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace a result folder made with other settings')
    return p


def _point_roots_at(cfg, path):
    """Accept a datasets root (``DAVIS/``, ``YTB/`` inside) or a dataset folder itself."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f'data folder not found: {path}')
    cfg.init_dir(data=path, root=cfg.DIR_ROOT)
    if not os.path.isdir(cfg.DIR_DAVIS) and os.path.isdir(os.path.join(path, 'JPEGImages')):
        cfg.DIR_DAVIS = path
    if not os.path.isdir(cfg.DIR_YTB) and any(
            os.path.isdir(os.path.join(path, d)) for d in ('2018', '2019', 'valid')):
        cfg.DIR_YTB = path


# flag -> config field (utils/cli.py): each is copied when given.
EVAL_FLAGS = (
    ('lstt_num', 'MODEL_LSTT_NUM', POSITIVE),
    ('lt_gap', 'TEST_LONG_TERM_MEM_GAP', POSITIVE),
    ('lt_max', 'TEST_LONG_TERM_MEM_MAX', POSITIVE),
    ('st_skip', 'TEST_SHORT_TERM_MEM_SKIP', POSITIVE),
    ('max_id_num', 'MODEL_MAX_OBJ_NUM', POSITIVE),
    ('ckpt_path', 'TEST_CKPT_PATH', GIVEN),
    ('ckpt_step', 'TEST_CKPT_STEP', POSITIVE),
    ('dataset', 'TEST_DATASET', GIVEN),
    ('split', 'TEST_DATASET_SPLIT', GIVEN),
)


def config_from_args(args):
    from configs.default import build_config
    cfg = build_config(args.stage, args.exp_name, args.model)
    result_root = cfg.DIR_EVALUATION
    if args.data_path:
        _point_roots_at(cfg, args.data_path)
    cfg.DIR_EVALUATION = args.result_path or result_root
    cfg.TEST_EMA = args.ema
    cfg.TEST_GPU_ID = args.gpu_id
    cfg.TEST_GPU_NUM = args.gpu_num
    apply_flags(cfg, args, EVAL_FLAGS)
    if cfg.TEST_DATASET not in DATASETS:
        raise ValueError(f'--dataset must be one of {", ".join(DATASETS)}, got '
                         f'{cfg.TEST_DATASET!r}')
    if cfg.TEST_DATASET_SPLIT not in SPLITS:
        raise ValueError(f'--split must be one of {", ".join(SPLITS)}, got '
                         f'{cfg.TEST_DATASET_SPLIT!r}')
    cfg.TEST_FLIP = args.flip
    cfg.TEST_MULTISCALE = list(args.ms)
    # As upstream: a short-edge limit only with multi-scale (against OOM); the long edge is
    # max_resolution scaled from 480p to 800p.
    cfg.TEST_MAX_SHORT_EDGE = args.max_resolution if cfg.TEST_MULTISCALE != [1.] else None
    cfg.TEST_MAX_LONG_EDGE = args.max_resolution * 800. / 480.
    data_dir = {'davis': cfg.DIR_DAVIS, 'youtubevos': cfg.DIR_YTB, 'custom': cfg.DIR_DATA}
    folder = next(v for k, v in data_dir.items() if cfg.TEST_DATASET.startswith(k))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'data folder not found: {folder} (for {cfg.TEST_DATASET}; '
                                f'pass --data_path)')
    return cfg


def main(argv=None):
    args = build_parser().parse_args(argv)
    from networks.managers.evaluator import run_evaluation
    from utils.checkpoint import CheckpointMismatchError, CheckpointReadError
    from utils.device import resolve_device
    try:
        cfg = config_from_args(args)
        device = resolve_device(args.device)
        run_evaluation(cfg, device=device, amp=args.precision or args.amp,
                       workers=args.workers if args.workers >= 0 else None,
                       overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, CheckpointMismatchError, CheckpointReadError) as exc:
        print(f'eval: error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
