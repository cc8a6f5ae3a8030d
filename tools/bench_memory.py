"""Memory over a long video with the long-term memory cap on and off (VideoObjectSegmenter).

Each setting runs in its own process on a generated clip (frames drawn on demand, never held),
and every ``--every`` frames records the process RSS (current and peak), the stored long-term
tokens and the bytes of the memory tensors; on CUDA also ``torch.cuda.memory_allocated``.
Prints a markdown table (what docs/memory.md shows) and optionally writes the series as CSV::

    python tools/bench_memory.py --frames 600 --size 120 216 --lt_gap 1 --caps 8 0 \\
        --threads 1 --csv docs/memory_rss.csv

``--caps 0`` means unbounded (upstream behaviour, what ``tools/eval.py`` does by default).
``--lt_gap 1`` stores every frame, the worst case; the models' own gaps (5 for the L models,
9999 for T/S/B) grow memory more slowly but just as surely.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.device import peak_rss_mb  # noqa: E402


class MovingShapes:
    """Frame source: a disc and a square moving over a panning texture, drawn per frame."""

    def __init__(self, n, h, w, seed=0):
        rng = np.random.default_rng(seed)
        self.texture = rng.integers(40, 220, (h, w + n, 3), dtype=np.uint8)
        self.size, self.fps, self._n = (h, w), None, n
        self.names = [f'{i:05d}' for i in range(n)]

    def __len__(self):
        return self._n

    def label(self, i):
        h, w = self.size
        yy, xx = np.mgrid[:h, :w]
        out = np.zeros((h, w), np.uint8)
        cx = (0.2 + 0.6 * (0.5 + 0.5 * np.sin(i / 20.))) * w
        out[(yy - 0.35 * h) ** 2 + (xx - cx) ** 2 < (0.15 * h) ** 2] = 1
        y0 = int((0.55 + 0.1 * np.cos(i / 15.)) * h)
        x0 = int((0.6 - 0.3 * np.sin(i / 25.)) * w)
        out[y0:y0 + h // 4, x0:x0 + h // 4] = 2
        return out

    def frame(self, i):
        img = self.texture[:, i % self._n:i % self._n + self.size[1]].copy()
        lab = self.label(i)
        img[lab == 1] = (210, 40, 40)
        img[lab == 2] = (40, 190, 60)
        return img

    def iter_frames(self, start=0):
        for i in range(start, self._n):
            yield self.frame(i)


def rss_mb():
    """Current resident set size of this process (Linux ``/proc``; else the peak)."""
    try:
        with open('/proc/self/statm') as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, AttributeError):
        return peak_rss_mb()


def run_one(args):
    """One setting, in this process: returns a list of per-sample dicts."""
    import torch
    from networks.managers.segmenter import VideoObjectSegmenter
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = MovingShapes(args.frames, *args.size)
    seg = VideoObjectSegmenter(args.model, device=args.device, amp=args.amp,
                               long_term_mem_max=args.cap or None, long_term_mem_gap=args.lt_gap,
                               return_probs=False)
    seg.open(clip)
    seg.add_mask(0, clip.label(0))
    cuda = seg.device.type == 'cuda'
    rows = []
    for out in seg.propagate():
        t = out.frame_idx
        if t % args.every == 0 or t == args.frames - 1:
            row = {'cap': args.cap or 'off', 'frame': t, 'rss_mb': round(rss_mb(), 1),
                   'peak_rss_mb': round(peak_rss_mb(), 1),
                   'lt_frames': seg.num_long_term_frames, 'lt_tokens': seg.num_long_term_tokens,
                   'memory_mb': round(seg.memory_bytes() / 2 ** 20, 2),
                   'fps': round(seg.fps, 2)}
            if cuda:
                row['cuda_mb'] = round(torch.cuda.memory_allocated(seg.device) / 2 ** 20, 1)
                row['cuda_peak_mb'] = round(
                    torch.cuda.max_memory_allocated(seg.device) / 2 ** 20, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='deaott')
    p.add_argument('--frames', type=int, default=600)
    p.add_argument('--size', type=int, nargs=2, default=(120, 216), metavar=('H', 'W'))
    p.add_argument('--lt_gap', type=int, default=1)
    p.add_argument('--caps', type=int, nargs='+', default=(8, 0),
                   help='long-term memory caps to compare (0: unbounded)')
    p.add_argument('--every', type=int, default=50, help='sample every N frames')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', action='store_true')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    p.add_argument('--csv', default='', help='also write every sample here')
    p.add_argument('--_cap', dest='cap', type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.cap is not None:  # child process: one setting, JSON rows on stdout
        print(json.dumps(run_one(args)))
        return 0

    series = {}
    for cap in args.caps:
        cmd = [sys.executable, os.path.abspath(__file__), '--_cap', str(cap)]
        for flag in ('model', 'frames', 'lt_gap', 'every', 'device', 'threads'):
            cmd += [f'--{flag}', str(getattr(args, flag))]
        cmd += ['--size', *map(str, args.size)] + (['--amp'] if args.amp else [])
        done = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
        series[cap] = json.loads(done.stdout.strip().splitlines()[-1])

    caps = list(series)
    print(f'\n{args.model}, {args.frames} frames at {args.size[0]}x{args.size[1]}, '
          f'lt_gap {args.lt_gap}, device {args.device}' + (', amp' if args.amp else ''))
    head = ['frame'] + [f'{c}: {k}' for c in ('cap ' + str(c) if c else 'no cap' for c in caps)
                        for k in ('RSS MB', 'LT frames', 'memory MB')]
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for rows in zip(*(series[c] for c in caps)):
        cells = [str(rows[0]['frame'])]
        for r in rows:
            cells += [f"{r['rss_mb']:.0f}", str(r['lt_frames']), f"{r['memory_mb']:.1f}"]
        print('| ' + ' | '.join(cells) + ' |')
    for c in caps:
        last = series[c][-1]
        print(f"{'cap ' + str(c) if c else 'no cap'}: peak RSS {last['peak_rss_mb']:.0f} MB, "
              f"{last['fps']:.2f} FPS (network)")
    if args.csv:
        rows = [r for c in caps for r in series[c]]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        tmp = args.csv + '.tmp'
        with open(tmp, 'w', newline='') as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, args.csv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
