"""Segment your own video: a video file or a frame folder plus the mask of the first frame.

Run from the repository root::

    python tools/demo.py                                   # built-in sample, no download
    python tools/demo.py --input video.mp4 --mask first_frame.png --output out/
    python tools/demo.py --input frames/ --mask masks/ --model r50_deaotl \\
        --ckpt_path pretrain_models/R50_DeAOTL_PRE_YTB_DAV.pth --amp

``--mask`` is one mask file for the first frame, or a folder of masks named like the frames they
belong to (``00000.png``, ``00042.png``...; for a video, the frame number), so objects can start
on later frames. Masks may be palette PNGs, grayscale 0/255 or 0/1, RGB renderings in palette
colours (anti-aliased edges are snapped); object ids are kept as they are in the output.

Writes into ``--output``:

- ``pred_masks/<seq>/<frame>.png``: one palette PNG per frame (object ids as given);
- ``<seq>_overlay.mp4``: the frames with objects coloured and outlined;
- ``summary.json``: frames, objects, model, checkpoint, whether the weights are trained, FPS of
  the network and end to end, and peak memory (process RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA).

Without ``--input`` a synthetic sample (moving shapes on a textured background, and its first-frame
mask) is generated into ``<output>/sample/`` and segmented. Without ``--ckpt_path`` the demo looks
for ``<MODEL_NAME>_<STAGE>.pth`` in ``pretrain_models/``; with none there it runs on untrained
(random) weights and says so: the masks are then meaningless. Long-term memory is capped
(``--max_memory_frames``, default 8), so memory stays flat on long videos. Existing results are
never replaced unless ``--overwrite`` is given.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.device import DeviceError, resolve_device  # noqa: E402
from utils.image import (MaskFormatError, MaskWarning, overlay_mask, read_mask,  # noqa: E402
                         save_mask)
from utils.video_io import (FrameSourceError, IMAGE_EXTENSIONS, VideoWriter,  # noqa: E402
                            natural_key, open_frames)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_DIR = os.path.join(REPO_ROOT, 'pretrain_models')
# Released checkpoints are named <MODEL_NAME>_<STAGE>.pth; the best stage first.
CKPT_STAGES = ('PRE_YTB_DAV', 'PRE_YTB', 'PRE_DAV', 'YTB', 'PRE')
SAMPLE_FRAMES, SAMPLE_SIZE = 40, (240, 432)


class DemoError(Exception):
    """A problem with the demo's inputs or outputs, reported as one line."""


def build_parser():
    p = argparse.ArgumentParser(
        description='Segment the objects of a video given their mask on the frame where each '
                    'first appears.')
    p.add_argument('--input', type=str, default='',
                   help='video file or folder of frames (default: a generated sample)')
    p.add_argument('--mask', type=str, default='',
                   help='mask of the first frame, or a folder of masks named like their frames')
    p.add_argument('--output', type=str, default='./demo_output')
    p.add_argument('--seq', type=str, default='',
                   help='sequence name used in output names (default: from --input)')
    p.add_argument('--model', type=str, default='deaott', help='model id, e.g. deaott, r50_deaotl')
    p.add_argument('--ckpt_path', type=str, default='',
                   help='checkpoint (default: <MODEL_NAME>_<STAGE>.pth in pretrain_models/)')
    p.add_argument('--device', type=str, default='', help='cpu, cuda, cuda:1... '
                   '(default: cuda when available)')
    p.add_argument('--amp', action='store_true',
                   help='autocast: float16 on CUDA, bfloat16 on CPU')
    p.add_argument('--max_memory_frames', type=int, default=8,
                   help='cap on long-term memory frames, reference frames kept (0: unbounded)')
    p.add_argument('--max_resolution', type=float, default=480 * 1.3,
                   help='frames are resized so the long edge is at most this * 800 / 480')
    p.add_argument('--lt_gap', type=int, default=-1,
                   help='long-term memory gap in frames (default: the model\'s)')
    p.add_argument('--fps', type=float, default=0,
                   help='frame rate of the overlay video (default: the input\'s, else 15)')
    p.add_argument('--overwrite', action='store_true', help='replace existing results')
    return p


# -- the built-in sample --------------------------------------------------------------------
def _sample_shapes(i, h, w):
    """Geometry of the three sample objects on frame ``i`` (id, kind, parameters, colour)."""
    disc = (int(w * 0.14 + w * 0.017 * i), int(h * 0.33 + h * 0.08 * np.sin(i / 6.)))
    rect_x = int(w * 0.76 - w * 0.012 * i)
    rect = ((rect_x, int(h * 0.62)), (rect_x + int(w * 0.14), int(h * 0.62) + int(h * 0.17)))
    ell_c = (int(w * 0.5), int(h * 0.5))
    return [(3, 'ellipse', (ell_c, (int(w * 0.1), int(h * 0.09)), 3.0 * i), (230, 200, 40)),
            (2, 'rect', rect, (40, 190, 70)),
            (1, 'disc', (disc, int(min(h, w) * 0.12)), (210, 40, 50))]


def _draw(canvas, kind, params, value):
    if kind == 'disc':
        cv2.circle(canvas, params[0], params[1], value, -1, lineType=cv2.LINE_8)
    elif kind == 'rect':
        cv2.rectangle(canvas, params[0], params[1], value, -1, lineType=cv2.LINE_8)
    else:
        cv2.ellipse(canvas, params[0], params[1], params[2], 0, 360, value, -1,
                    lineType=cv2.LINE_8)


def make_sample(folder, num_frames=None, size=None, seed=0):
    """Write a deterministic synthetic clip and its first-frame mask into ``folder``.

    Three objects (a disc, a rectangle, a rotating ellipse; ids 1, 2, 3) move over a smooth
    random texture that pans slowly; the disc passes in front of the ellipse. Returns
    ``(video_path, mask_path)``.
    """
    num_frames = SAMPLE_FRAMES if num_frames is None else num_frames
    h, w = SAMPLE_SIZE if size is None else size
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 200, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    coarse = 0.4 * coarse + 0.6 * coarse.mean(axis=2, keepdims=True)  # muted colours
    texture = cv2.resize(coarse, (w + 2 * num_frames, h), interpolation=cv2.INTER_CUBIC)
    texture += rng.normal(0, 8, texture.shape).astype(np.float32)
    grain = rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    video = os.path.join(folder, 'sample.mp4')
    mask_path = os.path.join(folder, 'sample_mask.png')
    with VideoWriter(video, fps=15, size=(h, w)) as writer:
        for i in range(num_frames):
            frame = texture[:, 2 * i:2 * i + w].copy()
            for _, kind, params, colour in _sample_shapes(i, h, w):
                layer = np.zeros((h, w), np.uint8)
                _draw(layer, kind, params, 1)
                frame[layer > 0] = np.asarray(colour, np.float32) + grain[layer > 0]
            writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    mask = np.zeros((h, w), np.uint8)
    for oid, kind, params, _ in _sample_shapes(0, h, w):
        _draw(mask, kind, params, oid)
    save_mask(mask, mask_path)
    return video, mask_path


# -- inputs ---------------------------------------------------------------------------------
def find_checkpoint(cfg, folder=None):
    """``<folder>/<MODEL_NAME>_<STAGE>.pth`` for the first stage of :data:`CKPT_STAGES` found
    (file names compared case-insensitively), else ``None``."""
    folder = PRETRAIN_DIR if folder is None else folder
    if not os.path.isdir(folder):
        return None
    files = {f.lower(): f for f in os.listdir(folder)}
    for stage in CKPT_STAGES:
        name = f'{cfg.MODEL_NAME}_{stage}.pth'.lower()
        if name in files:
            return os.path.join(folder, files[name])
    return None


def mask_files(mask_arg, source):
    """``{frame index: mask path}`` from ``--mask`` (a file for frame 0, or a folder)."""
    if os.path.isfile(mask_arg):
        return {0: mask_arg}
    if not os.path.isdir(mask_arg):
        raise DemoError(f'{mask_arg}: no such mask file or folder')
    names = {n: i for i, n in enumerate(source.names)}
    found = {}
    files = sorted((f for f in os.listdir(mask_arg)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')),
                   key=natural_key)
    for f in files:
        stem = os.path.splitext(f)[0]
        index = names.get(stem)
        if index is None and stem.isdigit():
            index = int(stem)
        if index is None or index >= len(source):
            raise DemoError(f'{os.path.join(mask_arg, f)}: the name matches no frame of the '
                            f'input ({len(source)} frames named {source.names[0]}..'
                            f'{source.names[-1]}); name masks after their frames')
        if index in found:
            raise DemoError(f'{os.path.join(mask_arg, f)}: a second mask for frame {index} '
                            f'({found[index]})')
        found[index] = os.path.join(mask_arg, f)
    if not found:
        raise DemoError(f'{mask_arg}: no mask images in the folder')
    return found


def _peak_rss_mb():
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024. ** 2 if sys.platform == 'darwin' else peak / 1024.


def _atomic_json(obj, path):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.summary.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as fh:
            json.dump(obj, fh, indent=2)
            fh.write('\n')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- the run --------------------------------------------------------------------------------
def run(args):
    """Run the demo for parsed ``args``; returns the summary dict."""
    from configs.default import build_config
    from networks.managers.segmenter import VideoObjectSegmenter

    if bool(args.input) != bool(args.mask):
        raise DemoError('--input and --mask go together (without both, the built-in sample runs)')
    output = os.path.abspath(args.output)
    sample = not args.input
    seq = args.seq or ('sample' if sample else
                       os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0])
    mask_dir = os.path.join(output, 'pred_masks', seq)
    overlay_path = os.path.join(output, f'{seq}_overlay.mp4')
    summary_path = os.path.join(output, 'summary.json')
    existing = [p for p in (mask_dir, overlay_path, summary_path) if os.path.exists(p)]
    if existing and not args.overwrite:
        raise DemoError(f'results already exist ({", ".join(existing)}); pass --overwrite to '
                        f'replace them or choose another --output')

    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        raise DemoError(str(exc)) from None
    try:
        cfg = build_config('pre_ytb_dav', 'demo', args.model)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    ckpt = args.ckpt_path or find_checkpoint(cfg)
    if args.ckpt_path and not os.path.isfile(args.ckpt_path):
        raise DemoError(f'{args.ckpt_path}: checkpoint not found')
    if not ckpt:
        names = ', '.join(f'{cfg.MODEL_NAME}_{s}.pth' for s in CKPT_STAGES[:2])
        print(f'\nWARNING: no trained weights for model {args.model!r}: no --ckpt_path and no '
              f'{names}... in {PRETRAIN_DIR}.\nWARNING: the network runs with UNTRAINED (random) '
              f'weights, so the masks it writes are MEANINGLESS; this run only shows that the '
              f'pipeline works.\nWARNING: put a released checkpoint in pretrain_models/ or pass '
              f'--ckpt_path.\n', file=sys.stderr, flush=True)

    if sample:
        video, first_mask = make_sample(os.path.join(output, 'sample'))
        args.input, args.mask = video, first_mask
    source = open_frames(args.input)
    masks = mask_files(args.mask, source)
    objects = set()
    for path in masks.values():  # read every mask once now, so bad files fail before any work
        objects |= {int(v) for v in np.unique(read_mask(path, size=source.size, max_id=255)) if v}
    if not objects:
        raise DemoError(f'{args.mask}: the masks hold no object (every pixel is 0)')

    torch.manual_seed(0)  # untrained runs give the same masks every time
    seg = VideoObjectSegmenter(
        args.model, ckpt_path=ckpt or None, device=device, amp=args.amp, cfg=cfg,
        max_memory_frames=args.max_memory_frames if args.max_memory_frames > 0 else None,
        long_term_mem_gap=args.lt_gap if args.lt_gap > 0 else None,
        max_resolution=args.max_resolution, return_probs=False)
    seg.open(source)

    if os.path.isdir(mask_dir):  # --overwrite: no stale frames from an earlier, longer run
        shutil.rmtree(mask_dir)
    os.makedirs(mask_dir)
    if seg.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(seg.device)
    fps = args.fps or source.fps or 15.
    from tqdm import tqdm
    start = time.perf_counter()
    written = 0
    # The frames are decoded here once and handed to step(): the overlay needs them too. Masks
    # are read when their frame comes, so a folder of many masks is never all in memory.
    with VideoWriter(overlay_path, fps=fps, size=source.size) as writer, \
            tqdm(total=len(source), desc=seq, unit='frame', dynamic_ncols=True) as bar:
        for index, frame in enumerate(source.iter_frames()):
            mask = None
            if index in masks:
                with warnings.catch_warnings():  # any repair was reported at the first read
                    warnings.simplefilter('ignore', MaskWarning)
                    mask = read_mask(masks[index], size=source.size, max_id=255)
            out = seg.step(frame, mask=mask)
            save_mask(out.label, os.path.join(mask_dir, source.names[index] + '.png'))
            writer.write(overlay_mask(frame, out.label, alpha=0.5))
            written += 1
            bar.update(1)
    wall = time.perf_counter() - start

    cuda = seg.device.type == 'cuda'
    peak_rss = _peak_rss_mb()
    summary = {
        'sequence': seq,
        'input': os.path.abspath(args.input),
        'masks': {source.names[i]: os.path.abspath(p) for i, p in sorted(masks.items())},
        'frames': written,
        'frame_size': list(source.size),
        'objects': sorted(int(o) for o in objects),
        'model': args.model,
        'checkpoint': os.path.abspath(ckpt) if ckpt else None,
        'weights_trained': bool(ckpt),
        'device': str(seg.device),
        'amp': bool(args.amp),
        'dtype': str(seg.dtype).replace('torch.', ''),
        'max_memory_frames': seg.max_memory_frames,
        'long_term_mem_gap': seg.long_term_mem_gap,
        'max_resolution': args.max_resolution,
        'fps': round(seg.fps, 3),
        'fps_end_to_end': round(written / wall, 3) if wall > 0 else None,
        'peak_memory_mb': round(torch.cuda.max_memory_allocated(seg.device) / 2 ** 20, 1)
        if cuda else (None if peak_rss is None else round(peak_rss, 1)),
        'peak_memory_kind': 'cuda_max_allocated' if cuda else 'process_peak_rss',
        'peak_rss_mb': None if peak_rss is None else round(peak_rss, 1),
        'outputs': {'masks': mask_dir, 'overlay': overlay_path},
    }
    if not ckpt:
        summary['note'] = 'untrained (random) weights: the masks are meaningless'
    _atomic_json(summary, summary_path)
    print(f'{seq}: {written} frames, objects {summary["objects"]}, {summary["fps"]:.2f} FPS '
          f'(network), peak memory {summary["peak_memory_mb"]} MB ({summary["peak_memory_kind"]})'
          f'\nmasks: {mask_dir}\noverlay: {overlay_path}\nsummary: {summary_path}')
    if not ckpt:
        print('WARNING: these masks come from UNTRAINED weights and are meaningless.',
              file=sys.stderr)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DemoError, FrameSourceError, MaskFormatError, FileNotFoundError) as exc:
        print(f'demo.py: error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
