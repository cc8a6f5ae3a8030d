"""Markdown rows of docs/results.md from the JSON files of ``eval_dev.py``.

    python tools/recipes/results_table.py results/dev/teacher.json results/dev/student.json ...

One row per file: name, model, J&F, J, F (in %), the J&F of each sequence, and the evaluator's
all-frame FPS (network time per frame after the first, this machine, as measured in that run).
"""
import json
import sys


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    seqs = sorted({s for r in runs for s in r['per_sequence']})
    head = ['run', 'model', 'J&F', 'J', 'F'] + seqs + ['FPS']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '|'.join(['---'] * 2 + ['---:'] * (len(head) - 2)) + '|')
    for r in runs:
        fps = r.get('timing', {}).get('overall', {}).get('all_frame_fps')
        cells = [r['name'], f"`{r['model']}`"] + [f'{100 * r[k]:.1f}' for k in ('J&F', 'J', 'F')]
        cells += [f"{100 * r['per_sequence'][s]['J&F']:.1f}" if s in r['per_sequence'] else ''
                  for s in seqs]
        cells.append(f'{fps:.2f}' if fps else '')
        print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main(sys.argv[1:])
