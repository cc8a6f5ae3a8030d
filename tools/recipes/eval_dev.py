"""Score one checkpoint on the DAVIS-2016 val-dev sequences as docs/results.md does.

    python tools/recipes/eval_dev.py --model deaott_gda --ckpt_path pretrain_models/deaott_gda_kd.pth \
        --name student --data_path ../shared/data/davis2016-val-dev --out results/dev

Runs ``tools/eval.py --dataset davis2016 --split val`` (the DAVIS-2016 protocol, scored by
``tools/davis_eval.py``'s code at the end of the run) and writes ``<out>/<name>.json``: global
J&F / J / F, per sequence J&F / J / F, FPS from the evaluator's ``timing.json``, and the exact
command. ``--max_resolution`` is upstream's flag (long edge <= value * 800 / 480); the shipped
models are trained on 161x161 crops of frames with a 240-pixel short edge and scored at 240.
"""
import argparse
import glob
import json
import os
import sys

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools import eval as eval_tool  # noqa: E402
from utils.io import atomic_write_text  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True)
    p.add_argument('--ckpt_path', required=True)
    p.add_argument('--name', required=True)
    p.add_argument('--data_path', default='../shared/data/davis2016-val-dev')
    p.add_argument('--out', default='results/dev')
    p.add_argument('--max_resolution', type=float, default=240)
    p.add_argument('--stage', default='pre_dav')
    p.add_argument('--amp', action='store_true')
    p.add_argument('--precision', default='', choices=('', 'fp32', 'bf16', 'fp16'))
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)

    result_path = os.path.join(args.out, args.name)
    cmd = ['--stage', args.stage, '--model', args.model, '--ckpt_path', args.ckpt_path,
           '--dataset', 'davis2016', '--split', 'val', '--data_path', args.data_path,
           '--result_path', result_path, '--device', args.device,
           '--max_resolution', str(args.max_resolution), '--workers', '1']
    if args.amp:
        cmd.append('--amp')
    if args.precision:
        cmd += ['--precision', args.precision]
    rc = eval_tool.main(cmd)
    if rc != 0:
        return rc
    found = sorted(glob.glob(os.path.join(result_path, 'davis2016', '*', 'jf_scores-val.json')),
                   key=os.path.getmtime)
    if not found:
        print(f'eval_dev: no jf_scores-val.json under {result_path}', file=sys.stderr)
        return 1
    run_dir = os.path.dirname(found[-1])
    scores = json.load(open(found[-1]))
    timing_path = os.path.join(run_dir, 'timing.json')
    timing = json.load(open(timing_path)) if os.path.isfile(timing_path) else {}
    per_seq = {}
    for key, obj in scores['per_object'].items():
        seq = key.rsplit('_', 1)[0]
        per_seq[seq] = {'J': obj['J-Mean'], 'F': obj['F-Mean'],
                        'J&F': (obj['J-Mean'] + obj['F-Mean']) / 2}
    g = scores['global']
    summary = {'name': args.name, 'model': args.model, 'ckpt_path': args.ckpt_path,
               'max_resolution': args.max_resolution, 'amp': args.amp, 'precision': args.precision or ('amp' if args.amp else 'fp32'),
               'J&F': g['J&F-Mean'], 'J': g['J-Mean'], 'F': g['F-Mean'],
               'per_sequence': per_seq, 'timing': timing,
               'command': 'python tools/eval.py ' + ' '.join(cmd)}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, args.name + '.json'),
                      json.dumps(summary, indent=1) + '\n')
    print(f'{args.name}: J&F {100 * g["J&F-Mean"]:.1f}  J {100 * g["J-Mean"]:.1f}  '
          f'F {100 * g["F-Mean"]:.1f}  ' + '  '.join(
              f'{s} {100 * v["J&F"]:.1f}' for s, v in per_seq.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
