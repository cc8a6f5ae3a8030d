"""Time our DAVIS-2016 J&F scorer against the third-party ``vos-benchmark`` on the same files.

The prediction is the union of the OSVOS DAVIS-2017 val results (any non-zero id = object,
written as 255 like the DAVIS-2016 ground truth) for the sequences of a DAVIS-2016 root; it is
built once in a temporary folder, then both scorers run on it (frames 1..N-2, as in DAVIS).

    python tools/bench_metrics.py \\
        --davis_path ../shared/data/davis2016-val-dev \\
        --osvos_path ../shared/data/davis2017-val-osvos-results --workers 2 --repeats 3

Prints the best wall time of each scorer (including process-pool start-up) and the largest
difference between their per-sequence J and F. ``vos-benchmark`` is optional
(``pip install --no-deps vos-benchmark==0.1.0``); without it only our time is printed.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from utils.metrics import evaluate_dataset, sequence_list  # noqa: E402


def build_union_results(davis_path, osvos_path, out_dir, year=2016, set_name='val'):
    """Write ``out_dir/<seq>/<frame>.png`` = 255 * (OSVOS ids != 0) for every GT frame."""
    seqs = sequence_list(davis_path, set_name, 'semi-supervised', year)
    for seq in seqs:
        os.makedirs(os.path.join(out_dir, seq), exist_ok=True)
        gt_dir = os.path.join(davis_path, 'Annotations', '480p', seq)
        for name in sorted(os.listdir(gt_dir)):
            if not name.endswith('.png'):
                continue
            src = os.path.join(osvos_path, seq, name)
            union = (np.array(Image.open(src)) != 0).astype(np.uint8) * 255
            Image.fromarray(union, mode='L').save(os.path.join(out_dir, seq, name))
    return seqs


def run_ours(davis_path, results, workers):
    scores = evaluate_dataset(davis_path, results, 'semi-supervised', 'val', 2016, workers=workers)
    return {k.rsplit('_', 1)[0]: (v['J-Mean'], v['F-Mean']) for k, v in scores['per_object'].items()}


def run_vos_benchmark(gt_root, results, workers):
    from vos_benchmark.benchmark import benchmark

    _, _, _, objects = benchmark([gt_root], [results], strict=False, num_processes=workers,
                                 verbose=False, skip_first_and_last=True)
    # One object (id 255) per DAVIS-2016 sequence; vos-benchmark reports x100.
    return {seq: (j[255] / 100, f[255] / 100) for seq, (j, f) in objects[0].items()}


def best_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--davis_path', required=True, help='DAVIS-2016 root (Annotations/480p, ImageSets)')
    p.add_argument('--osvos_path', required=True, help='OSVOS DAVIS-2017 val results folder')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix='bench_metrics_')
    try:
        # A GT root holding only the evaluated sequences, as vos-benchmark scores every folder.
        results = os.path.join(tmp, 'results')
        seqs = build_union_results(args.davis_path, args.osvos_path, results)
        gt_root = os.path.join(tmp, 'gt')
        os.makedirs(gt_root)
        for seq in seqs:
            os.symlink(os.path.abspath(os.path.join(args.davis_path, 'Annotations', '480p', seq)),
                       os.path.join(gt_root, seq))
        n_frames = sum(len(os.listdir(os.path.join(gt_root, s))) - 2 for s in seqs)
        print(f'{len(seqs)} sequences, {n_frames} scored frames, workers={args.workers}, '
              f'best of {args.repeats}')

        t_ours, ours = best_time(lambda: run_ours(args.davis_path, results, args.workers), args.repeats)
        print(f'ours (utils.metrics, 2016 binary): {t_ours:.2f} s')
        try:
            import vos_benchmark  # noqa: F401
        except ImportError:
            print('vos-benchmark not installed (pip install --no-deps vos-benchmark==0.1.0); skipped')
            return 0
        t_vb, theirs = best_time(lambda: run_vos_benchmark(gt_root, results, args.workers), args.repeats)
        print(f'vos-benchmark 0.1.0:               {t_vb:.2f} s')
        diff = max(abs(a - b) for s in seqs for a, b in zip(ours[s], theirs[s]))
        print(f'max |ours - vos-benchmark| over per-sequence J and F: {diff:.3g}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
