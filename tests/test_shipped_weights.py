"""The weights shipped in pretrain_models/: their sha256 equals the model card's, they load
strictly into their model ids, and the student's J&F on one DAVIS-2016 val-dev sequence equals
the figure in docs/results.md (slow; needs ../shared)."""
import hashlib
import json
import os
import re

import pytest
import torch

from networks.models import load_vos_model
from networks.models.zoo import PRETRAIN_DIR, SHIPPED_WEIGHTS, find_checkpoint
from tests.conftest import REPO, shared_path

README = REPO / 'pretrain_models' / 'README.md'
RESULTS = REPO / 'docs' / 'results.md'
# The sequence the slow test scores (the shortest of the 5 val-dev sequences).
CHECK_SEQUENCE = 'libby'


def card_checksums():
    """``{file name: sha256}`` from the checksum table of pretrain_models/README.md."""
    rows = re.findall(r'^\|\s*`([^`]+\.pth)`\s*\|\s*`?([0-9a-f]{64})`?\s*\|', README.read_text(),
                      flags=re.M)
    return dict(rows)


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize('model_id', sorted(SHIPPED_WEIGHTS))
def test_shipped_file_matches_its_checksum_and_size_limit(model_id):
    name = SHIPPED_WEIGHTS[model_id]
    path = os.path.join(PRETRAIN_DIR, name)
    assert os.path.isfile(path), f'{path}: shipped weights missing'
    sums = card_checksums()
    assert name in sums, f'{name} has no sha256 row in {README}'
    assert sha256(path) == sums[name]
    assert os.path.getsize(path) <= 40 * 2 ** 20
    assert find_checkpoint(model_id) == path


@pytest.mark.parametrize('model_id', sorted(SHIPPED_WEIGHTS))
def test_shipped_weights_load_strictly_as_float32(model_id):
    path = os.path.join(PRETRAIN_DIR, SHIPPED_WEIGHTS[model_id])
    cfg, model, report = load_vos_model(model_id, path, strict=True)
    assert not report['new'] and not report.get('missing')
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def documented_student_score(sequence):
    """J&F (in %) of the shipped student on ``sequence``, from docs/results.md's per-sequence
    table row of the shipped student (marked ``**shipped**``)."""
    text = RESULTS.read_text()
    header = next(line for line in text.splitlines()
                  if line.startswith('|') and CHECK_SEQUENCE in line and 'J&F' in line)
    cols = [c.strip() for c in header.strip('|').split('|')]
    row = next(line for line in text.splitlines()
               if line.startswith('|') and '**shipped**' in line)
    cells = [c.strip() for c in row.strip('|').split('|')]
    return float(cells[cols.index(sequence)])


@pytest.mark.slow
def test_student_scores_as_documented_on_one_val_dev_sequence(tmp_path):
    src = shared_path('data', 'davis2016-val-dev')
    # A DAVIS root with the one sequence (links, nothing copied).
    root = tmp_path / 'DAVIS'
    for kind in ('JPEGImages', 'Annotations'):
        (root / kind / '480p').mkdir(parents=True)
        os.symlink(src / kind / '480p' / CHECK_SEQUENCE, root / kind / '480p' / CHECK_SEQUENCE)
    (root / 'ImageSets' / '480p').mkdir(parents=True)
    (root / 'ImageSets' / '480p' / 'val.txt').write_text(
        f'/JPEGImages/480p/{CHECK_SEQUENCE}/00000.jpg /Annotations/480p/{CHECK_SEQUENCE}/00000.png\n')
    from tools.recipes import eval_dev
    out = tmp_path / 'out'
    rc = eval_dev.main(['--model', 'deaott_gda', '--ckpt_path',
                        os.path.join(PRETRAIN_DIR, SHIPPED_WEIGHTS['deaott_gda']),
                        '--name', 'student', '--data_path', str(root), '--out', str(out)])
    assert rc == 0
    got = json.loads((out / 'student.json').read_text())['per_sequence'][CHECK_SEQUENCE]['J&F']
    assert abs(100 * got - documented_student_score(CHECK_SEQUENCE)) <= 1.0


def test_demo_and_api_default_to_the_shipped_student(tmp_path, monkeypatch):
    from networks.managers.segmenter import VideoObjectSegmenter
    from tools import demo
    monkeypatch.setattr(demo, 'SAMPLE_FRAMES', 4)
    out = tmp_path / 'demo_output'
    assert demo.main(['--output', str(out), '--device', 'cpu']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    student = os.path.join(PRETRAIN_DIR, SHIPPED_WEIGHTS['deaott_gda'])
    assert summary['model'] == 'deaott_gda' and summary['weights_trained'] is True
    assert summary['checkpoint'] == student and 'sample_scores' in summary
    seg = VideoObjectSegmenter(device='cpu')
    assert seg.model_id == 'deaott_gda' and seg.ckpt_path == student
