"""DAVIS J&F: official-toolkit values, an independent per-frame reference, the CLI, bad input,
and a cross-check against the third-party ``vos-benchmark`` on real DAVIS-2016 data."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, shared_path
from tools import davis_eval
from utils import metrics

SYNTH = ('reference', 'davis_synth')
# Each expected.json run -> (task, results folder inside davis_synth, year).
RUNS = {
    'semi-supervised/perturbed': ('semi-supervised', 'results/semi-supervised/perturbed', 2017),
    'semi-supervised/perfect': ('semi-supervised', 'results/semi-supervised/perfect', 2017),
    'unsupervised/proposals': ('unsupervised', 'results/unsupervised/proposals', 2017),
    'davis2016-binary/semi-supervised/perturbed': (
        'semi-supervised', 'results/semi-supervised/perturbed', 2016),
}
TOL = 1e-6


def _expected():
    with open(shared_path(*SYNTH, 'expected.json')) as fh:
        return json.load(fh)


def _writable_copy(src, dst):
    """Copy a (read-only) shared folder into tmp and make it writable."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for root, dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return dst


def _assert_scores_match(got, want, tol=TOL):
    """Every global, per-object and per-frame value of ``want`` (expected.json layout)."""
    for key, value in want['global'].items():
        assert got['global'][key] == pytest.approx(value, abs=tol), key
    assert list(got['per_object']) == list(want['per_object'])
    for name, obj in want['per_object'].items():
        mine = got['per_object'][name]
        for key, value in obj.items():
            if key == 'frames' or key.startswith('matched_'):
                assert mine[key] == value, (name, key)
            elif isinstance(value, list):
                np.testing.assert_allclose(mine[key], value, rtol=0, atol=tol, err_msg=f'{name} {key}')
            else:
                assert mine[key] == pytest.approx(value, abs=tol), (name, key)


# --------------------------------------------------------------------------------------------
# (1) Official toolkit values on the synthetic set
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('run', list(RUNS))
def test_matches_official_toolkit(run):
    want = _expected()['runs'][run]
    task, results, year = RUNS[run]
    assert want['task'] == task and want['binary_davis2016_mode'] == (year == 2016)
    root = shared_path(*SYNTH)
    got = metrics.evaluate_dataset(str(root / 'DAVIS'), str(root / results), task=task,
                                   set_name=want['set'], year=year, workers=1)
    _assert_scores_match(got, want)


def test_workers_give_identical_numbers():
    root = shared_path(*SYNTH)
    args = (str(root / 'DAVIS'), str(root / 'results/unsupervised/proposals'), 'unsupervised')
    one = metrics.evaluate_dataset(*args, workers=1)
    two = metrics.evaluate_dataset(*args, workers=2)
    assert one == two  # bit-identical, not just close


# --------------------------------------------------------------------------------------------
# (2) Per-frame J and F against an independent float64 reference (spec §2-§3)
# --------------------------------------------------------------------------------------------

def _ref_j(gt, pr, void=None):
    keep = np.ones(gt.shape, bool) if void is None else ~void
    inter = float(np.sum(gt & pr & keep, dtype=np.float64))
    union = float(np.sum((gt | pr) & keep, dtype=np.float64))
    return 1.0 if union == 0 else inter / union


def _ref_bmap(m):
    """seg2bmap written literally from the spec: zero-filled shifts, then the overrides in order."""
    h, w = m.shape
    east, south, south_east = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    east[:, :w - 1] = m[:, 1:]
    south[:h - 1, :] = m[1:, :]
    south_east[:h - 1, :w - 1] = m[1:, 1:]
    b = (m != east) | (m != south) | (m != south_east)
    for x in range(w):
        b[h - 1, x] = m[h - 1, x] != east[h - 1, x]
    for y in range(h):
        below = m[y + 1, w - 1] if y + 1 < h else False
        b[y, w - 1] = m[y, w - 1] != below
    b[h - 1, w - 1] = False
    return b


def _ref_matched(src, target, radius):
    """Pixels of ``src`` within Euclidean distance ``radius`` of some ``target`` pixel."""
    ps, pt = np.argwhere(src).astype(np.float64), np.argwhere(target).astype(np.float64)
    if len(ps) == 0 or len(pt) == 0:
        return 0
    d2 = ((ps[:, None, :] - pt[None, :, :]) ** 2).sum(-1)
    return int(np.sum(d2.min(axis=1) <= radius * radius))


def _ref_f(gt, pr, void=None, radius=None):
    h, w = gt.shape
    if radius is None:
        radius = np.ceil(0.008 * np.sqrt(float(h * h + w * w)))
    if void is not None:
        gt, pr = gt & ~void, pr & ~void
    bg, bp = _ref_bmap(gt), _ref_bmap(pr)
    n_g, n_p = float(bg.sum()), float(bp.sum())
    if n_p == 0 and n_g == 0:
        precision = recall = 1.0
    elif n_p == 0:
        precision, recall = 1.0, 0.0
    elif n_g == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = _ref_matched(bp, bg, radius) / n_p
        recall = _ref_matched(bg, bp, radius) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _random_mask(rng, h, w):
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        ry, rx = rng.uniform(0.1, 0.5) * h, rng.uniform(0.1, 0.5) * w
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    m ^= rng.random((h, w)) < 0.01  # specks and holes: isolated pixels, ragged boundaries
    return m


def _mask_pairs(h, w, seed):
    rng = np.random.default_rng(seed)
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    dot = empty.copy()
    dot[h // 2, w // 3] = True
    corner = empty.copy()
    corner[h // 2:, w // 2:] = True  # touches the bottom and right borders
    pairs = [(_random_mask(rng, h, w), _random_mask(rng, h, w)) for _ in range(6)]
    pairs += [(empty, empty), (empty, dot), (dot, empty), (full, empty), (empty, full),
              (full, full), (corner, full), (dot, dot), (corner, _random_mask(rng, h, w))]
    return pairs


@pytest.mark.parametrize('h,w,seed', [(48, 64, 0), (37, 53, 1), (101, 137, 2), (96, 250, 3)])
def test_j_and_f_match_independent_reference(h, w, seed):
    for gt, pr in _mask_pairs(h, w, seed):
        assert metrics.region_similarity(gt, pr) == pytest.approx(_ref_j(gt, pr), abs=1e-12)
        assert metrics.boundary_f_measure(gt, pr) == pytest.approx(_ref_f(gt, pr), abs=1e-12)


def test_j_and_f_with_void_and_fixed_radius_match_reference():
    rng = np.random.default_rng(7)
    h, w = 60, 80
    for gt, pr in _mask_pairs(h, w, 5):
        void = _random_mask(rng, h, w) & (rng.random((h, w)) < 0.5)
        assert metrics.region_similarity(gt, pr, void) == pytest.approx(_ref_j(gt, pr, void), abs=1e-12)
        assert metrics.boundary_f_measure(gt, pr, void) == pytest.approx(
            _ref_f(gt, pr, void), abs=1e-12)
        for radius in (3, 6):  # bound_th >= 1 is a radius in pixels
            assert metrics.boundary_f_measure(gt, pr, bound_th=radius) == pytest.approx(
                _ref_f(gt, pr, radius=radius), abs=1e-12)


def test_stacked_frames_equal_per_frame_calls():
    pairs = _mask_pairs(40, 50, 11)
    gts, prs = np.stack([g for g, _ in pairs]), np.stack([p for _, p in pairs])
    np.testing.assert_array_equal(metrics.region_similarity(gts, prs),
                                  [_ref_j(g, p) for g, p in pairs])
    np.testing.assert_allclose(metrics.boundary_f_measure(gts, prs),
                               [_ref_f(g, p) for g, p in pairs], rtol=0, atol=1e-12)


def test_boundary_map_rules():
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (1, 7), (6, 1), (2, 2), (23, 31)]:
        m = rng.random((h, w)) < 0.5
        np.testing.assert_array_equal(metrics.boundary_map(m), _ref_bmap(m))
    dot = np.zeros((6, 7), bool)
    dot[3, 4] = True
    expect = np.zeros_like(dot)
    expect[2:4, 3:5] = True  # an isolated pixel yields the 2x2 block towards the origin
    np.testing.assert_array_equal(metrics.boundary_map(dot), expect)
    assert not metrics.boundary_map(np.ones((9, 11), bool)).any()  # border is never a boundary


def test_radius_and_disk():
    from skimage.morphology import disk as sk_disk

    # Spec §3 table (W x H -> r).
    for (w, h), r in {(854, 480): 8, (910, 480): 9, (1152, 480): 10, (160, 96): 2,
                      (137, 101): 2, (64, 48): 1}.items():
        assert metrics.boundary_radius(h, w) == r
    assert metrics.boundary_radius(480, 854, bound_th=5) == 5
    for r in range(11):
        np.testing.assert_array_equal(metrics.disk(r), sk_disk(r).astype(np.uint8))
    assert int(metrics.disk(8).sum()) == 197


def test_object_statistics():
    # Decay quadrant start/end ids from the spec (MATLAB rounding, 0-based).
    table = {1: [0, 0, 0, 0, 0], 2: [0, 0, 1, 1, 1], 5: [0, 1, 2, 3, 4], 8: [0, 2, 4, 5, 7],
             10: [0, 2, 5, 7, 9], 98: [0, 24, 49, 73, 97]}
    for n, ids in table.items():
        assert metrics.decay_bin_ids(n).tolist() == ids
    v = np.array([0.9, 0.5, 0.7, 0.2, 0.6, 0.1, 0.8, 0.3, 0.4, 0.0])
    mean, recall, decay = metrics.object_statistics(v)
    assert mean == pytest.approx(v.sum() / 10, abs=1e-15)
    assert recall == pytest.approx(4 / 10)  # 0.5 itself is not > 0.5
    # ids for N=10: [0, 2, 5, 7, 9] -> first bin v[0..2], last bin v[7..9] (inclusive).
    assert decay == pytest.approx((0.9 + 0.5 + 0.7) / 3 - (0.3 + 0.4 + 0.0) / 3, abs=1e-15)
    assert metrics.object_statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))


# --------------------------------------------------------------------------------------------
# (3) CLI end to end
# --------------------------------------------------------------------------------------------

def _read_csv(path):
    with open(path) as fh:
        rows = [line.rstrip('\n').split(',') for line in fh]
    return rows[0], rows[1:]


def test_cli_writes_csvs_and_json_and_never_reuses_stale_results(tmp_path):
    want = _expected()['runs']['semi-supervised/perturbed']
    davis = str(shared_path(*SYNTH, 'DAVIS'))
    results = _writable_copy(shared_path(*SYNTH, 'results/semi-supervised/perturbed'),
                             tmp_path / 'results')
    out_json = tmp_path / 'scores.json'
    # As a user runs it: a script from the repository root, in a fresh interpreter.
    proc = subprocess.run(
        [sys.executable, 'tools/davis_eval.py', '--davis_path', davis, '--results_path',
         str(results), '--task', 'semi-supervised', '--json', str(out_json), '--workers', '1'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'Global results for val' in proc.stdout and 'synth-hd_2' in proc.stdout

    header, rows = _read_csv(results / 'global_results-val.csv')
    assert header == list(metrics.GLOBAL_COLUMNS)
    assert rows == [[f'{want["global"][c]:.3f}' for c in header]]
    header, rows = _read_csv(results / 'per-sequence_results-val.csv')
    assert header == ['Sequence', 'J-Mean', 'F-Mean']
    assert rows == [[k, f'{v["J-Mean"]:.3f}', f'{v["F-Mean"]:.3f}']
                    for k, v in want['per_object'].items()]
    with open(out_json) as fh:
        first = json.load(fh)
    _assert_scores_match(first, want)

    # Change one scored prediction: synth-single frame 00002 becomes perfect (= GT).
    gt = np.array(Image.open(os.path.join(davis, 'Annotations/480p/synth-single/00002.png')))
    Image.fromarray(gt.astype(np.uint8)).save(results / 'synth-single' / '00002.png')
    assert davis_eval.main(['--davis_path', davis, '--results_path', str(results),
                            '--json', str(out_json), '--workers', '1']) == 0
    with open(out_json) as fh:
        second = json.load(fh)
    old, new = first['per_object']['synth-single_1'], second['per_object']['synth-single_1']
    idx = old['frames'].index('00002')
    assert new['J-per-frame'][idx] == 1.0 and old['J-per-frame'][idx] < 1.0
    assert second['global']['J-Mean'] > first['global']['J-Mean']
    assert second['global'] == metrics.evaluate_dataset(davis, str(results), workers=1)['global']
    header, rows = _read_csv(results / 'global_results-val.csv')
    assert rows == [[f'{second["global"][c]:.3f}' for c in header]]
    assert not [p for p in os.listdir(results) if p.endswith('.tmp')]  # no temp files left


# --------------------------------------------------------------------------------------------
# (4) Bad input: clear errors that name the file
# --------------------------------------------------------------------------------------------

@pytest.fixture
def synth_copy(tmp_path):
    return _writable_copy(shared_path(*SYNTH, 'results/semi-supervised/perturbed'), tmp_path / 'res')


def _evaluate(results, workers=1, **kw):
    return metrics.evaluate_dataset(str(shared_path(*SYNTH, 'DAVIS')), str(results),
                                    workers=workers, **kw)


def test_first_and_last_result_frames_are_never_read(synth_copy):
    want = _expected()['runs']['semi-supervised/perturbed']
    os.remove(synth_copy / 'synth-odd' / '00000.png')
    os.remove(synth_copy / 'synth-odd' / '00008.png')
    assert _evaluate(synth_copy)['global'] == pytest.approx(want['global'], abs=TOL)


def test_missing_result_frame_names_the_file(synth_copy, capsys):
    missing = synth_copy / 'synth-odd' / '00004.png'
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _evaluate(synth_copy)
    assert davis_eval.main(['--davis_path', str(shared_path(*SYNTH, 'DAVIS')),
                            '--results_path', str(synth_copy), '--workers', '1']) == 1
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize('workers', [1, 2])
def test_result_of_wrong_size_names_the_file(synth_copy, workers):
    bad = synth_copy / 'synth-long' / '00005.png'
    Image.fromarray(np.zeros((48, 65), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=f'{bad}.*65x48.*64x48'):
        _evaluate(synth_copy, workers=workers)


def test_unreadable_and_rgb_results_name_the_file(synth_copy):
    bad = synth_copy / 'synth-hd' / '00003.png'
    bad.write_bytes(b'not a png at all')
    with pytest.raises(ValueError, match=f'cannot read mask {bad}'):
        _evaluate(synth_copy)
    Image.fromarray(np.zeros((480, 854, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=f'{bad}.*RGB.*single-channel'):
        _evaluate(synth_copy)


def test_id_above_object_count_names_the_file(synth_copy):
    bad = synth_copy / 'synth-single' / '00004.png'
    label = np.array(Image.open(bad))
    label[0, 0] = 2  # synth-single has one object
    Image.fromarray(label.astype(np.uint8)).save(bad)
    with pytest.raises(ValueError, match=f'{bad} contains object id 2.*synth-single has 1 object'):
        _evaluate(synth_copy)


def test_bad_arguments():
    davis = str(shared_path(*SYNTH, 'DAVIS'))
    with pytest.raises(FileNotFoundError, match='ImageSets'):
        metrics.evaluate_dataset(davis, davis, set_name='test-dev', workers=1)
    with pytest.raises(ValueError, match='semi-supervised protocol only'):
        metrics.evaluate_dataset(davis, davis, task='unsupervised', year=2016, workers=1)
    with pytest.raises(FileNotFoundError, match='results folder not found'):
        metrics.evaluate_dataset(davis, davis + '/nope', workers=1)


# --------------------------------------------------------------------------------------------
# (5) Real data: our DAVIS-2016 scores equal vos-benchmark's on the same files
# --------------------------------------------------------------------------------------------

def test_davis2016_dev_matches_vos_benchmark(tmp_path):
    vos_benchmark = pytest.importorskip(
        'vos_benchmark.benchmark',
        reason='vos-benchmark is not installed (CI: pip install --no-deps vos-benchmark==0.1.0)')
    davis = shared_path('data', 'davis2016-val-dev')
    osvos = shared_path('data', 'davis2017-val-osvos-results')
    gt_root = davis / 'Annotations' / '480p'
    seqs = sorted(os.listdir(gt_root))
    assert len(seqs) == 5
    # The prediction: union of the OSVOS objects, stored as 255 like the DAVIS-2016 GT so that
    # vos-benchmark (which matches raw ids) sees the same single object.
    results = tmp_path / 'union'
    for seq in seqs:
        (results / seq).mkdir(parents=True)
        for name in sorted(os.listdir(gt_root / seq)):
            union = np.array(Image.open(osvos / seq / name)) != 0
            Image.fromarray(union.astype(np.uint8) * 255).save(results / seq / name)

    ours = metrics.evaluate_dataset(str(davis), str(results), year=2016, workers=2)
    assert list(ours['per_object']) == [f'{s}_1' for s in ours['sequences']]
    assert sorted(ours['sequences']) == seqs  # read from ImageSets/480p/val.txt frame lines

    theirs_j, theirs_f = [], []
    for seq in seqs:
        _, iou, bf = vos_benchmark.VideoEvaluator(str(gt_root), str(results))(seq)
        assert list(iou) == [255]
        mine = ours['per_object'][f'{seq}_1']
        assert mine['J-Mean'] == pytest.approx(iou[255] / 100, abs=TOL), seq
        assert mine['F-Mean'] == pytest.approx(bf[255] / 100, abs=TOL), seq
        theirs_j.append(iou[255] / 100)
        theirs_f.append(bf[255] / 100)
    assert ours['global']['J-Mean'] == pytest.approx(np.mean(theirs_j), abs=TOL)
    assert ours['global']['F-Mean'] == pytest.approx(np.mean(theirs_f), abs=TOL)
    assert 0.5 < ours['global']['J&F-Mean'] < 1.0  # a sane score for OSVOS
