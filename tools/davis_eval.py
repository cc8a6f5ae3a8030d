"""Score DAVIS 2016/2017 results with the official J&F protocol (see ``utils/metrics.py``).

Usage (from the repository root)::

    python tools/davis_eval.py --davis_path DAVIS --results_path results/val \\
        --task semi-supervised [--set val] [--year 2017] [--json scores.json] [--workers N]

Like the official ``davis2017-evaluation`` script it prints the global and per-object tables and
writes ``global_results-<set>.csv`` and ``per-sequence_results-<set>.csv`` (3 decimals) into the
results folder. Unlike it, the scores are always recomputed (the toolkit silently prints old
CSVs when both exist), the CSVs are replaced atomically, the default task is semi-supervised,
and ``--year 2016`` scores binary DAVIS-2016 masks (any non-zero pixel is the object).
``--json`` keeps full precision: ``global`` and ``per_object`` (keys ``<seq>_<k>``).

From Python (e.g. after an evaluation run)::

    from tools.davis_eval import evaluate_davis
    scores = evaluate_davis(davis_root, results_dir, 'semi-supervised', 'val', 2017)
    scores['global']['J&F-Mean']
"""
import argparse
import json
import os
import sys
import time

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.io import atomic_write_text  # noqa: E402
from utils.metrics import GLOBAL_COLUMNS, TASKS, evaluate_dataset  # noqa: E402


def csv_paths(results_path, set_name):
    return (os.path.join(results_path, f'global_results-{set_name}.csv'),
            os.path.join(results_path, f'per-sequence_results-{set_name}.csv'))


def write_csvs(scores, results_path, set_name):
    """The toolkit's two CSVs (values in [0, 1], ``%.3f``, one per-sequence row per object)."""
    global_csv, seq_csv = csv_paths(results_path, set_name)
    g = scores['global']
    atomic_write_text(global_csv, ','.join(GLOBAL_COLUMNS) + '\n'
                  + ','.join(f'{g[c]:.3f}' for c in GLOBAL_COLUMNS) + '\n')
    rows = ['Sequence,J-Mean,F-Mean']
    rows += [f'{name},{obj["J-Mean"]:.3f},{obj["F-Mean"]:.3f}'
             for name, obj in scores['per_object'].items()]
    atomic_write_text(seq_csv, '\n'.join(rows) + '\n')
    return global_csv, seq_csv


def write_json(scores, path):
    atomic_write_text(path, json.dumps(scores, indent=1) + '\n')


def _table(header, rows):
    """Right-aligned text table, like ``pandas.DataFrame.to_string(index=False)``."""
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return '\n'.join(' '.join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def format_tables(scores):
    set_name = scores['set']
    g = scores['global']
    out = [f'--------------------------- Global results for {set_name} ---------------------------',
           _table(GLOBAL_COLUMNS, [[f'{g[c]:.6f}' for c in GLOBAL_COLUMNS]]),
           '', f'---------- Per sequence results for {set_name} ----------',
           _table(('Sequence', 'J-Mean', 'F-Mean'),
                  [[n, f'{o["J-Mean"]:.6f}', f'{o["F-Mean"]:.6f}']
                   for n, o in scores['per_object'].items()])]
    return '\n'.join(out)


def evaluate_davis(davis_path, results_path, task='semi-supervised', set='val', year=2017,
                   workers=None, json_path=None, write_csv=True, verbose=False):
    """Score ``results_path`` against the DAVIS ground truth in ``davis_path``.

    Args:
        davis_path: DAVIS root (``ImageSets``, ``Annotations/480p`` ...).
        results_path: folder of ``<seq>/<frame>.png`` label maps.
        task: 'semi-supervised' or 'unsupervised'.
        set: image set name ('val', 'train', ...).
        year: 2017, or 2016 for binary single-object masks.
        workers: processes (default: all cores; 1 = in-process; same numbers either way).
        json_path: if given, write the full-precision scores there.
        write_csv: write the toolkit's CSVs into ``results_path``.
        verbose: print the tables.

    Returns:
        dict with 'global' (``J&F-Mean``, ``J-Mean``, ``J-Recall``, ``J-Decay``, ``F-Mean``,
        ``F-Recall``, ``F-Decay``; values in [0, 1]) and 'per_object' keyed ``<seq>_<k>``.
    """
    set_name = set
    scores = evaluate_dataset(davis_path, results_path, task=task, set_name=set_name, year=year,
                              workers=workers)
    scores['davis_path'] = os.path.abspath(davis_path)
    scores['results_path'] = os.path.abspath(results_path)
    if write_csv:
        write_csvs(scores, results_path, set_name)
    if json_path:
        write_json(scores, json_path)
    if verbose:
        print(format_tables(scores))
    return scores


def build_parser():
    p = argparse.ArgumentParser(description='DAVIS J&F evaluation (official protocol).')
    p.add_argument('--davis_path', required=True, help='DAVIS root with ImageSets and Annotations')
    p.add_argument('--results_path', required=True, help='folder with <seq>/<frame>.png results')
    p.add_argument('--task', default='semi-supervised', choices=TASKS)
    p.add_argument('--set', default='val', help='image set (default: val)')
    p.add_argument('--year', type=int, default=2017, choices=(2016, 2017),
                   help='2016: binary masks, sequence list from ImageSets/2016 or ImageSets/480p')
    p.add_argument('--json', default=None, help='write full-precision scores to this JSON file')
    p.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    p.add_argument('--no_csv', action='store_true', help='do not write the CSVs into results_path')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        evaluate_davis(args.davis_path, args.results_path, task=args.task, set=args.set,
                       year=args.year, workers=args.workers, json_path=args.json,
                       write_csv=not args.no_csv, verbose=True)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f'davis_eval: error: {exc}', file=sys.stderr)
        return 1
    print(f'\nTotal time: {time.time() - start:.2f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
