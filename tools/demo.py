"""Segment your own video: a video file or a frame folder plus the mask of the first frame.

Run from the repository root::

    python tools/demo.py                                   # built-in sample, no download
    python tools/demo.py --input video.mp4 --mask first_frame.png --output out/
    python tools/demo.py --input frames/ --mask masks/ --model r50_deaotl \\
        --ckpt_path pretrain_models/R50_DeAOTL_PRE_YTB_DAV.pth --amp

``--mask`` is one mask file for the first frame, or a folder of masks named like the frames they
belong to (``00000.png``, ``00042.png``...; for a video, the frame number), so objects can start
on later frames. A mask named by a bare number goes to the frame whose name holds that number
(``4.png`` -> ``00004.jpg``, not the 5th frame); the mapping is printed. Masks may be palette
PNGs, grayscale 0/255 or 0/1, RGB renderings in palette colours (anti-aliased edges are snapped);
object ids are kept as they are in the output, except palette index 255, which is void (DAVIS)
and read as background, as evaluation reads it.

Writes into ``--output``:

- ``pred_masks/<seq>/<frame>.png``: one palette PNG per frame (object ids as given);
- ``<seq>_overlay.mp4``: the frames with objects coloured and outlined;
- ``summary.json``: frames, objects, model, checkpoint, whether the weights are trained, FPS of
  the network and end to end, and peak memory (process RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA).

Without ``--input`` the built-in sample (real photographs in motion with exact ground truth, see
``dataloaders/sample_video.py``) is written into ``<output>/sample/`` and segmented, and its J&F
is printed. The default model is the shipped distilled student ``deaott_gda``. Without
``--ckpt_path`` the demo looks in ``pretrain_models/`` for a released ``<MODEL_NAME>_<STAGE>.pth``,
then for the project's shipped weights (``networks/models/zoo.py``); with none there it runs on
untrained (random) weights and says so: the masks are then meaningless. Long-term memory is capped
(``--lt_max``, default 8), so memory stays flat on long videos. Existing results are
never replaced unless ``--overwrite`` is given, and then only once the new run has succeeded (it
is written into a hidden staging folder in ``--output`` and moved into place at the end). An
``--output`` that is or contains the input or the masks is refused. A video that decodes fewer
frames than its container announces is an error (``--allow_short_video`` keeps what decodes and
records the shortfall in ``summary.json``). Odd frame sizes are padded by one black row/column
in the overlay (mp4 needs even sizes); the masks keep the frame size.
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.checkpoint import CheckpointMismatchError, CheckpointReadError  # noqa: E402
from utils.device import DeviceError, peak_memory_mb, peak_rss_mb, resolve_device  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402
from utils.image import (MaskFormatError, MaskWarning, overlay_mask, read_mask,  # noqa: E402
                         save_mask)
from utils.video_io import (FrameSourceError, IMAGE_EXTENSIONS, VideoWriter,  # noqa: E402
                            natural_key, open_frames)

from dataloaders.sample_video import (LICENCE as SAMPLE_LICENCE, SAMPLE_FRAMES,  # noqa: E402
                                      SAMPLE_SIZE, make_sample, sample_scores)
from networks.engines.memory import APP_LONG_TERM_MEM_MAX  # noqa: E402
from networks.models.zoo import (DEFAULT_MODEL, PRETRAIN_DIR, expected_files,  # noqa: E402
                                 find_checkpoint)


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
    p.add_argument('--model', type=str, default=DEFAULT_MODEL,
                   help=f'model id, e.g. deaott, r50_deaotl (default {DEFAULT_MODEL}, the shipped '
                        f'distilled student)')
    p.add_argument('--ckpt_path', type=str, default='',
                   help='checkpoint (default: a released <MODEL_NAME>_<STAGE>.pth or the shipped '
                        'weights in pretrain_models/)')
    p.add_argument('--device', type=str, default='', help='cpu, cuda, cuda:1... '
                   '(default: cuda when available)')
    p.add_argument('--amp', action='store_true',
                   help='autocast: float16 on CUDA, bfloat16 on CPU')
    p.add_argument('--precision', default='', choices=('', 'fp32', 'bf16', 'fp16'),
                   help='compute dtype (default fp32; bf16 is the CPU fast path, '
                        'docs/benchmark.md); overrides --amp')
    p.add_argument('--lt_max', '--max_memory_frames', dest='lt_max', type=int,
                   default=APP_LONG_TERM_MEM_MAX,
                   help='cap on long-term memory frames, reference frames kept (0: unbounded; '
                        'docs/memory.md)')
    p.add_argument('--max_resolution', type=float, default=480 * 1.3,
                   help='frames are resized so the long edge is at most this * 800 / 480')
    p.add_argument('--lt_gap', type=int, default=-1,
                   help='long-term memory gap in frames (default: the model\'s)')
    p.add_argument('--fps', type=float, default=0,
                   help='frame rate of the overlay video (default: the input\'s, else 15)')
    p.add_argument('--backend', choices=('torch', 'onnxruntime'), default='torch',
                   help='onnxruntime: run the files tools/export_onnx.py wrote (--ckpt_path '
                        'student.onnx; needs pip install -e ".[onnx]")')
    p.add_argument('--overwrite', action='store_true',
                   help='replace existing results (only once the new run has succeeded)')
    p.add_argument('--allow_short_video', action='store_true',
                   help='accept a video that decodes fewer frames than its container announces '
                        '(damaged or truncated file); the shortfall is recorded in summary.json')
    return p


# -- inputs ---------------------------------------------------------------------------------
def _frame_number(name):
    """The number a frame name holds (``'00042'`` -> 42, ``'frame_7'`` -> 7), else None."""
    digits = re.findall(r'\d+', name)
    return int(digits[-1]) if digits else None


def mask_files(mask_arg, source):
    """``{frame index: mask path}`` from ``--mask`` (a file for frame 0, or a folder).

    A mask in a folder belongs to the frame with its name (``00042.png`` -> frame ``00042``);
    a mask named by a bare number belongs to the frame whose name holds that number
    (``4.png`` -> ``00004.jpg`` or ``frame_4.jpg``), never to the 5th frame. Frames of a video
    file are named by their index (``00000``...).
    """
    if os.path.isfile(mask_arg):
        return {0: mask_arg}
    if not os.path.isdir(mask_arg):
        raise DemoError(f'{mask_arg}: no such mask file or folder')
    names = {n: i for i, n in enumerate(source.names)}
    numbers = {}
    for i, n in enumerate(source.names):
        numbers.setdefault(_frame_number(n), []).append(i)
    found = {}
    files = sorted((f for f in os.listdir(mask_arg)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')),
                   key=natural_key)
    for f in files:
        path = os.path.join(mask_arg, f)
        stem = os.path.splitext(f)[0]
        index = names.get(stem)
        if index is None and stem.isdigit():
            hits = numbers.get(int(stem), [])
            if len(hits) > 1:
                raise DemoError(f'{path}: the number {int(stem)} is in several frame names '
                                f'({", ".join(source.names[i] for i in hits[:3])}); name the '
                                f'mask exactly like its frame')
            index = hits[0] if hits else None
        if index is None:
            raise DemoError(f'{path}: the name matches no frame of the input ({len(source)} '
                            f'frames named {source.names[0]}..{source.names[-1]}); name masks '
                            f'after their frames (by name, or by the number in the name)')
        if index in found:
            raise DemoError(f'{path}: a second mask for frame {source.names[index]} '
                            f'({found[index]})')
        found[index] = path
    if not found:
        raise DemoError(f'{mask_arg}: no mask images in the folder')
    return found


def _inside(path, folder):
    """``path`` is ``folder`` or lies under it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_location(output, inputs):
    """Refuse an ``--output`` that is or contains an input (frames, video or masks): results
    there could replace the inputs."""
    for what, path in inputs:
        if path and _inside(path, output):
            raise DemoError(f'--output {output} contains the {what} {path}; results are '
                            f'written (and with --overwrite replaced) there, so choose an '
                            f'--output outside the inputs')


# -- the run --------------------------------------------------------------------------------
def run(args):
    """Run the demo for parsed ``args``; returns the summary dict.

    Nothing under ``--output`` is touched until the run has succeeded: masks, overlay and
    summary are written into a hidden staging folder in ``--output`` and moved into place at the
    end (with ``--overwrite``, replacing the old ones only then).
    """
    from configs.default import build_config
    from networks.managers.segmenter import VideoObjectSegmenter

    if bool(args.input) != bool(args.mask):
        raise DemoError('--input and --mask go together (without both, the built-in sample runs)')
    output = os.path.abspath(args.output)
    sample = not args.input
    if not sample:
        check_output_location(output, [('input', args.input), ('mask', args.mask)])
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
    onnx = getattr(args, 'backend', 'torch') == 'onnxruntime'
    if onnx and not args.ckpt_path.endswith('.onnx'):
        raise DemoError('--backend onnxruntime needs --ckpt_path <name>.onnx (the export '
                        'tools/export_onnx.py wrote)')
    ckpt = args.ckpt_path or find_checkpoint(args.model, cfg.MODEL_NAME, PRETRAIN_DIR)
    if args.ckpt_path and not os.path.isfile(args.ckpt_path):
        raise DemoError(f'{args.ckpt_path}: checkpoint not found')
    if not ckpt:
        names = ', '.join(expected_files(args.model, cfg.MODEL_NAME))
        print(f'\nWARNING: no trained weights for model {args.model!r}: no --ckpt_path and no '
              f'{names}... in {PRETRAIN_DIR}.\nWARNING: the network runs with UNTRAINED (random) '
              f'weights, so the masks it writes are MEANINGLESS; this run only shows that the '
              f'pipeline works.\nWARNING: put a released checkpoint in pretrain_models/ or pass '
              f'--ckpt_path.\n', file=sys.stderr, flush=True)

    gt_dir = None
    if sample:
        video, first_mask, gt_dir = make_sample(os.path.join(output, 'sample'), SAMPLE_FRAMES,
                                                SAMPLE_SIZE)
        args.input, args.mask = video, first_mask
        print(f'sample video: {SAMPLE_LICENCE}', flush=True)
    source = open_frames(args.input)   # a frame folder's sizes are all checked here
    masks = mask_files(args.mask, source)
    if os.path.isdir(args.mask):
        print('masks -> frames (by frame name, or the number in it): ' + ', '.join(
            f'{os.path.basename(p)} -> {source.names[i]}' for i, p in sorted(masks.items())),
            flush=True)
    objects = set()
    for path in masks.values():  # read every mask once now, so bad files fail before any work
        objects |= {int(v) for v in np.unique(read_mask(path, size=source.size, max_id=255)) if v}
    if not objects:
        raise DemoError(f'{args.mask}: the masks hold no object (every pixel is 0 or void)')

    torch.manual_seed(0)  # untrained runs give the same masks every time
    try:
        seg = VideoObjectSegmenter(
            args.model, ckpt_path=ckpt or None, device=device, amp=args.amp,
            dtype=args.precision or None, cfg=cfg,
            long_term_mem_max=args.lt_max if args.lt_max > 0 else None,
            long_term_mem_gap=args.lt_gap if args.lt_gap > 0 else None,
            max_resolution=args.max_resolution, return_probs=False,
            backend='onnxruntime' if onnx else 'torch')
    except (ImportError, ValueError) as exc:
        if not onnx:
            raise
        raise DemoError(str(exc)) from None
    seg.open(source)

    created_output = not os.path.isdir(output)
    os.makedirs(output, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{seq}.run-', dir=output)
    try:
        summary = _segment_into(args, seg, source, masks, objects, seq, ckpt, gt_dir, staging,
                                mask_dir, overlay_path)
        _swap_in(staging, mask_dir, overlay_path, summary_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_output and not os.listdir(output):
            os.rmdir(output)

    print(f'{seq}: {summary["frames"]} frames, objects {summary["objects"]}, '
          f'{summary["fps"]:.2f} FPS (network), peak memory {summary["peak_memory_mb"]} MB '
          f'({summary["peak_memory_kind"]})\nmasks: {mask_dir}\noverlay: {overlay_path}\n'
          f'summary: {summary_path}')
    if summary['overlay_size'] != summary['frame_size']:
        h, w = summary['frame_size']
        print(f'note: the overlay is {summary["overlay_size"][1]}x{summary["overlay_size"][0]} '
              f'(WxH): the {w}x{h} frames padded with black at the bottom/right (mp4 needs even '
              f'sizes); the masks are {w}x{h}')
    if gt_dir is not None:
        scores = summary['sample_scores']
        print(f'sample J&F {100 * scores["J&F"]:.1f} (J {100 * scores["J"]:.1f}, '
              f'F {100 * scores["F"]:.1f}) against its ground truth ({gt_dir})')
    if not ckpt:
        print('WARNING: these masks come from UNTRAINED weights and are meaningless.',
              file=sys.stderr)
    return summary


def _segment_into(args, seg, source, masks, objects, seq, ckpt, gt_dir, staging, mask_dir,
                  overlay_path):
    """Segment the video into ``staging`` (masks/, overlay.mp4, summary.json); returns the
    summary, which names the final locations."""
    stage_masks = os.path.join(staging, 'masks')
    os.makedirs(stage_masks)
    if seg.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(seg.device)
    fps = args.fps or source.fps or 15.
    from tqdm import tqdm
    start = time.perf_counter()
    written, labels = 0, []
    # The frames are decoded here once and handed to step(): the overlay needs them too. Masks
    # are read when their frame comes, so a folder of many masks is never all in memory.
    with VideoWriter(os.path.join(staging, 'overlay.mp4'), fps=fps, size=source.size) as writer, \
            tqdm(total=len(source), desc=seq, unit='frame', dynamic_ncols=True) as bar:
        for index, frame in enumerate(source.iter_frames()):
            mask = None
            if index in masks:
                with warnings.catch_warnings():  # any repair was reported at the first read
                    warnings.simplefilter('ignore', MaskWarning)
                    mask = read_mask(masks[index], size=source.size, max_id=255)
            out = seg.step(frame, mask=mask)
            save_mask(out.label, os.path.join(stage_masks, source.names[index] + '.png'))
            if gt_dir is not None:
                labels.append(out.label)
            writer.write(overlay_mask(frame, out.label, alpha=0.5))
            written += 1
            bar.update(1)
        overlay_size = list(writer.video_size)
    wall = time.perf_counter() - start
    problems = []
    if written < len(source):
        msg = (f'{args.input}: only {written} of the {len(source)} frames the container '
               f'announces could be decoded (a damaged or truncated file)')
        missing = sorted(i for i in masks if i >= written)
        if missing:
            raise DemoError(f'{msg}; the masks for frames '
                            f'{", ".join(source.names[i] for i in missing)} were never used. '
                            f'Nothing was written')
        if not args.allow_short_video:
            raise DemoError(f'{msg}. Nothing was written; pass --allow_short_video to keep the '
                            f'frames that decode')
        print(f'WARNING: {msg}; the results cover frames 0..{written - 1} only.',
              file=sys.stderr, flush=True)
        problems.append(msg)

    cuda = seg.device.type == 'cuda'
    peak_rss = peak_rss_mb()
    summary = {
        'sequence': seq,
        'input': os.path.abspath(args.input),
        'masks': {source.names[i]: os.path.abspath(p) for i, p in sorted(masks.items())},
        'frames': written,
        'frames_announced': len(source),
        'frame_size': list(source.size),
        'overlay_size': overlay_size,
        'objects': sorted(int(o) for o in objects),
        'model': args.model,
        'checkpoint': os.path.abspath(ckpt) if ckpt else None,
        'weights_trained': bool(ckpt),
        'device': str(seg.device),
        'amp': bool(args.amp), 'precision': args.precision or ('amp' if args.amp else 'fp32'),
        'dtype': str(seg.dtype).replace('torch.', ''),
        'backend': getattr(seg, 'backend', 'torch'),
        'long_term_mem_max': seg.long_term_mem_max,
        'long_term_mem_gap': seg.long_term_mem_gap,
        'max_resolution': args.max_resolution,
        'fps': round(seg.fps, 3),
        'fps_end_to_end': round(written / wall, 3) if wall > 0 else None,
        'peak_memory_mb': round(peak_memory_mb(seg.device), 1)
        if cuda else (None if peak_rss is None else round(peak_rss, 1)),
        'peak_memory_kind': 'cuda_max_allocated' if cuda else 'process_peak_rss',
        'peak_rss_mb': None if peak_rss is None else round(peak_rss, 1),
        'outputs': {'masks': mask_dir, 'overlay': overlay_path},
    }
    if problems:
        summary['warnings'] = problems
    if gt_dir is not None:
        gt = [read_mask(os.path.join(gt_dir, f'{i:05d}.png'), max_id=255)
              for i in range(len(labels))]
        scores = sample_scores(labels, gt)
        summary['sample_scores'] = {k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in scores.items()}
        summary['sample_licence'] = SAMPLE_LICENCE
    if not ckpt:
        summary['note'] = 'untrained (random) weights: the masks are meaningless'
    atomic_write_json(os.path.join(staging, 'summary.json'), summary, indent=2)
    return summary


def _swap_in(staging, mask_dir, overlay_path, summary_path):
    """Move a finished run from ``staging`` into place, replacing an earlier run's results
    (an earlier, longer run's extra masks go with its folder)."""
    old = None
    if os.path.isdir(mask_dir):
        old = os.path.join(staging, 'replaced_masks')
        os.replace(mask_dir, old)
    try:
        os.makedirs(os.path.dirname(mask_dir), exist_ok=True)
        os.replace(os.path.join(staging, 'masks'), mask_dir)
    except BaseException:
        if old is not None and not os.path.exists(mask_dir):
            os.replace(old, mask_dir)
        raise
    os.replace(os.path.join(staging, 'overlay.mp4'), overlay_path)
    os.replace(os.path.join(staging, 'summary.json'), summary_path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DemoError, FrameSourceError, MaskFormatError, FileNotFoundError,
            CheckpointMismatchError, CheckpointReadError) as exc:
        print(f'demo.py: error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
