"""Command line: score DAVIS 2016/2017 results with the official J&F protocol.

The scoring (and the CSV/JSON files) is :func:`utils.metrics.evaluate_davis`; this module is
its command line and re-exports it for older imports.

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

    from utils.metrics import evaluate_davis
    scores = evaluate_davis(davis_root, results_dir, 'semi-supervised', 'val', 2017)
    scores['global']['J&F-Mean']
"""
import argparse
import os
import sys
import time

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.metrics import (GLOBAL_COLUMNS, TASKS, csv_paths, evaluate_davis,  # noqa: E402,F401
                           format_tables, write_csvs)


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
