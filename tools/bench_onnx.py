"""onnxruntime vs torch: speed, agreement, memory and file size of the exported student.

::

    python tools/bench_onnx.py --frames 20 --threads 2 --int8
    python tools/bench_onnx.py --ckpt_path pretrain_models/deaott_gda_kd.pth --int8

Exports the model (``tools/export_onnx.py``'s code) for ``--frame_size`` into a temporary folder
(or uses ``--onnx``), then in **one process** runs the torch segmenter and the onnxruntime
segmenter(s) on the same frames, **alternating frame by frame** (the order rotates every frame),
so that a busy machine slows every backend alike. Frames: the first DAVIS-2016 val-dev sequence
at 480p when ``../shared/data/davis2016-val-dev`` exists (first-frame mask from its annotation),
else a generated 480x854 clip. Per-frame time is :attr:`VideoObjectSegmenter.fps`'s (resize,
network, logits at frame size); the first ``--warmup`` propagated frames are not timed.

Memory: each backend then runs alone in a fresh subprocess over the same frames; peak RSS of
that process (``VmHWM``: model, runtime, activations, memory) and the bytes of the stored
memory are reported (torch there has its default init unless ``--ckpt_path``).

Weights: ``--ckpt_path``, else the golden-recipe weights of ``tests/golden_weights.py`` (speed
does not depend on weights; the recipe keeps the features non-degenerate so the agreement
figures mean something). Prints one JSON object.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DAVIS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared',
                     'data', 'davis2016-val-dev')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='deaott_gda')
    p.add_argument('--ckpt_path', default='')
    p.add_argument('--onnx', default='', help='use this export instead of exporting')
    p.add_argument('--frame_size', type=int, nargs=2, default=(480, 854))
    p.add_argument('--frames', type=int, default=20)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--lt_max', '--max_memory_frames', dest='lt_max', type=int, default=8,
                   help='long-term memory cap (long_term_mem_max; docs/memory.md)')
    p.add_argument('--int8', action='store_true', help='also the dynamically quantised copy')
    p.add_argument('--no_memory', action='store_true', help='skip the per-backend subprocesses')
    p.add_argument('--_child', default='', help=argparse.SUPPRESS)
    p.add_argument('--_onnx_path', default='', help=argparse.SUPPRESS)
    return p


def load_frames(n, frame_size):
    """``(frames, first mask, ground truth or None, source)`` at ``frame_size``."""
    import cv2
    import numpy as np
    h, w = frame_size
    if os.path.isdir(DAVIS):
        from utils.image import read_mask
        root = os.path.join(DAVIS, 'JPEGImages', '480p')
        seq = sorted(os.listdir(root))[0]
        names = sorted(os.listdir(os.path.join(root, seq)))[:n]
        frames, gts = [], []
        for name in names:
            img = cv2.imread(os.path.join(root, seq, name))[:, :, ::-1]
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            frames.append(np.ascontiguousarray(img))
            gt = read_mask(os.path.join(DAVIS, 'Annotations', '480p', seq, name[:-4] + '.png'))
            gts.append(cv2.resize(gt.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST))
        return frames, gts[0], gts, f'DAVIS-2016 val-dev {seq}, frames 0-{len(names) - 1}'
    rng = np.random.default_rng(0)
    tex = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames, yy, xx = [], *np.mgrid[:h, :w]
    mask = None
    for i in range(n):
        f = np.roll(tex, 3 * i, axis=1).copy()
        lab = ((yy - h * 0.5) ** 2 + (xx - w * (0.3 + 0.01 * i)) ** 2 < (0.2 * h) ** 2)
        f[lab] = (220, 40, 40)
        frames.append(f)
        mask = lab.astype(np.uint8) if mask is None else mask
    return frames, mask, None, f'generated {h}x{w} clip'


def load_model(args):
    import torch
    from configs.default import build_config
    from networks.models import build_vos_model, load_vos_model
    if args.ckpt_path:
        cfg, model, _ = load_vos_model(args.model, ckpt_path=args.ckpt_path, device='cpu')
        return cfg, model, args.ckpt_path
    from tests.golden_weights import recipe_for_module
    cfg = build_config('pre_ytb_dav', 'default', args.model)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    model.load_state_dict(recipe_for_module(model, 3), strict=True)
    torch.manual_seed(0)
    return cfg, model.eval(), 'golden recipe (untrained)'


def make_segmenter(kind, args, cfg=None, model=None, onnx_path=None):
    from networks.managers.segmenter import VideoObjectSegmenter
    common = dict(device='cpu', long_term_mem_max=args.lt_max)
    if kind == 'torch':
        return VideoObjectSegmenter(model, ckpt_path=None, cfg=cfg, **common)
    return VideoObjectSegmenter(args.model, ckpt_path=onnx_path, backend='onnxruntime',
                                onnx_threads=args.threads, **common)


def peak_rss_mb():
    """Peak RSS of this process image (``VmHWM``; ``ru_maxrss`` survives ``exec`` on Linux and
    would report the parent's peak)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.


def child(args):
    """One backend alone: peak RSS over the run."""
    import torch
    torch.set_num_threads(args.threads)
    frames, mask, _, _ = load_frames(args.frames, args.frame_size)
    cfg = model = None
    if args._child == 'torch':   # default init without a checkpoint: the recipe's generator
        from networks.models import load_vos_model     # would dominate the peak
        cfg, model, _ = load_vos_model(args.model, ckpt_path=args.ckpt_path or None)
    seg = make_segmenter('torch' if args._child == 'torch' else 'onnx', args, cfg, model,
                         args._onnx_path)
    loaded = peak_rss_mb()
    for i, f in enumerate(frames):
        seg.step(f, mask if i == 0 else None)
    print(json.dumps({'peak_rss_mb': round(peak_rss_mb(), 1),
                      'rss_after_load_mb': round(loaded, 1),
                      'memory_bytes': seg.memory_bytes()}))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._child:
        return child(args)
    import torch
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix='bench_onnx_')
    try:
        return _compare(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compare(args, tmp):
    import numpy as np
    import torch
    from networks.engines.onnx_graphs import bundle_paths, export_student
    from tools.export_onnx import network_input_size, quantize_int8

    cfg, model, weights = load_model(args)
    paths = {'fp32': args.onnx}
    if not args.onnx:
        size = network_input_size(cfg, args.frame_size, 480 * 1.3)
        t0 = time.perf_counter()
        paths['fp32'] = export_student(model, cfg, os.path.join(tmp, 'student.onnx'),
                                       size)['propagate']
        export_s = time.perf_counter() - t0
    if args.int8:
        paths['int8'] = quantize_int8(bundle_paths(paths['fp32']))['propagate']

    frames, mask, gts, source = load_frames(args.frames, args.frame_size)
    backends = {'torch': make_segmenter('torch', args, cfg, model)}
    for name, p in paths.items():
        backends[f'onnxruntime {name}'] = make_segmenter('onnx', args, onnx_path=p)
    names = list(backends)
    times = {n: [] for n in names}
    labels = {n: [] for n in names}
    logit_diff = {n: 0.0 for n in names[1:]}
    for i, f in enumerate(frames):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            seg = backends[n]
            before = seg.stats['seconds']
            out = seg.step(f, mask if i == 0 else None)
            if i > args.warmup:
                times[n].append(seg.stats['seconds'] - before)
            labels[n].append(out.label)
        ref = backends['torch'].engine.aot_engines[0].pred_id_logits
        if ref is not None:
            for n in names[1:]:
                got = backends[n].engine.aot_engines[0].pred_id_logits
                logit_diff[n] = max(logit_diff[n], float((got - ref).abs().max()))

    def iou(a, b):
        inter, union = np.logical_and(a, b).sum(), np.logical_or(a, b).sum()
        return 1.0 if union == 0 else inter / union

    result = {'model': args.model, 'weights': weights, 'frames': source,
              'frame_size': list(args.frame_size), 'threads': args.threads,
              'timed_frames': len(times['torch']), 'torch': torch.__version__,
              'long_term_mem_max': args.lt_max, 'backends': {}}
    if not args.onnx:
        result['export_seconds'] = round(export_s, 1)
    import onnxruntime
    result['onnxruntime'] = onnxruntime.__version__
    ref_ms = float(np.median(times['torch'])) * 1e3
    for n in names:
        ms = float(np.median(times[n])) * 1e3
        row = {'median_ms': round(ms, 1), 'fps': round(1e3 / ms, 3),
               'speed_vs_torch': round(ref_ms / ms, 3)}
        if n != 'torch':
            p = paths[n.split()[-1]]
            row['file_mb'] = round(sum(os.path.getsize(q) for q in bundle_paths(p).values())
                                   / 2 ** 20, 1)
            row['max_abs_logit_diff_vs_torch'] = logit_diff[n]
            row['label_iou_vs_torch'] = round(float(np.mean(
                [iou(a > 0, b > 0) for a, b in zip(labels['torch'][1:], labels[n][1:])])), 4)
        if gts is not None:
            row['J_vs_annotation'] = round(float(np.mean(
                [iou(a > 0, g > 0) for a, g in zip(labels[n][1:], gts[1:])])), 4)
        result['backends'][n] = row
    print(json.dumps(result), file=sys.stderr, flush=True)   # speed figures, before memory
    if not args.no_memory:
        for n in names:
            cmd = [sys.executable, os.path.abspath(__file__), '--_child',
                   'torch' if n == 'torch' else 'onnx', '--model', args.model,
                   '--frames', str(args.frames), '--threads', str(args.threads),
                   '--lt_max', str(args.lt_max),
                   '--frame_size', *map(str, args.frame_size)]
            if args.ckpt_path:
                cmd += ['--ckpt_path', args.ckpt_path]
            if n != 'torch':
                cmd += ['--_onnx_path', paths[n.split()[-1]]]
            print(f'memory: {n} alone...', file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result['backends'][n].update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
