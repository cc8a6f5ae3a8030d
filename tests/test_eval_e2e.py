"""End-to-end evaluation: ``tools/eval.py`` on tiny DAVIS- and YouTube-VOS-style datasets.

Random-weight DeAOT-T (``--ckpt_path test``), flip on. What is checked comes from the formats
(the DAVIS protocol of docs/metrics_speed.md and upstream's evaluator loop), never from a previous run of this code:
every expected PNG, palette mode with upstream's palette, original ids only, the ground-truth
size, the given annotations reproduced where they are given, objects absent before they
appear, the zip's exact entry list, the J&F files, resuming without recomputing, the
new-object-count fix, and a 2-process run equal to a 1-process run.
"""
import json
import os
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import networks.managers.evaluator as evaluator_module
from tests.conftest import REPO
from tools.eval import main
from utils.image import _palette, save_mask

EXP = 'e2e'
STAGE_NAME = 'PRE_YTB_DAV'
COMMON = ['--exp_name', EXP, '--stage', 'pre_ytb_dav', '--model', 'deaott', '--ckpt_path',
          'test', '--device', 'cpu', '--workers', '0']


# ------------------------------------------------------------------------------------------
# Tiny datasets
# ------------------------------------------------------------------------------------------

def _blob_frame(rng, h, w, boxes):
    """A frame with textured background and one coloured rectangle per object, and its mask.

    ``boxes``: {original id: (y, x, bh, bw)}.
    """
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for oid, (y, x, bh, bw) in boxes.items():
        colour = np.array([(oid * 53) % 256, (oid * 97) % 256, 120 + (oid * 31) % 120])
        img[y:y + bh, x:x + bw] = colour
        mask[y:y + bh, x:x + bw] = oid
    return img, mask


def _write_jpg(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])


def make_davis(root, seqs=('bear', 'cows'), n_frames=5, n_obj=12, h=480, w=96):
    """DAVIS-2017 layout with ground truth for every frame (so the run is scored)."""
    rng = np.random.default_rng(1)
    for s, seq in enumerate(seqs):
        for t in range(n_frames):
            boxes = {}
            for k in range(n_obj):
                row, col = divmod(k, 2)
                boxes[k + 1] = (10 + row * 75 + t * 2, 4 + col * 46 + s, 50, 36)
            img, mask = _blob_frame(rng, h, w, boxes)
            _write_jpg(os.path.join(root, 'JPEGImages', '480p', seq, f'{t:05d}.jpg'), img)
            save_mask(mask, os.path.join(root, 'Annotations', '480p', seq, f'{t:05d}.png'))
    os.makedirs(os.path.join(root, 'ImageSets', '2017'))
    with open(os.path.join(root, 'ImageSets', '2017', 'val.txt'), 'w') as f:
        f.write('\n'.join(seqs) + '\n')


# YouTube-VOS-style videos: {video: {original id: first frame index}} over frames 0, 5, 10...
YTB_VIDEOS = {
    'vid_a': {'n': 6, 'objects': {2: 0, 7: 0, 5: 2}},   # id 5 appears at the third frame
    'vid_b': {'n': 5, 'objects': {1: 1, 3: 3}},         # starts at 00005; id 3 mid-video
}
YTB_SIZE = (64, 112)


def _ytb_boxes(oid, t):
    return (4 + (oid % 4) * 14, 4 + (oid * 13) % 70 + t, 12, 18)


def make_youtubevos(root, year=2019, dense=False, videos=YTB_VIDEOS):
    """``root/<year>/valid`` (+ ``valid_all_frames`` when ``dense``): frames every 5 steps in
    ``valid``, annotations only where objects first appear, holding just those objects."""
    rng = np.random.default_rng(2)
    h, w = YTB_SIZE
    valid = os.path.join(root, str(year), 'valid')
    meta = {'videos': {}}
    for vid, spec in videos.items():
        n_dense = (spec['n'] - 1) * 5 + 1
        objects = {}
        for oid, first in spec['objects'].items():
            objects[str(oid)] = {'category': 'thing',
                                 'frames': [f'{5 * t:05d}' for t in range(first, spec['n'])]}
        meta['videos'][vid] = {'objects': objects}
        for td in range(n_dense):
            t = td / 5.0
            visible = {oid: _ytb_boxes(oid, int(t)) for oid, first in spec['objects'].items()
                       if t >= first}
            img, mask = _blob_frame(rng, h, w, visible)
            name = f'{td:05d}'
            if dense:
                _write_jpg(os.path.join(root, str(year), 'valid_all_frames', 'JPEGImages', vid,
                                        name + '.jpg'), img)
            if td % 5:
                continue
            _write_jpg(os.path.join(valid, 'JPEGImages', vid, name + '.jpg'), img)
            new = [oid for oid, first in spec['objects'].items() if first == td // 5]
            if new:
                given = np.where(np.isin(mask, new), mask, 0).astype(np.uint8)
                save_mask(given, os.path.join(valid, 'Annotations', vid, name + '.png'))
    with open(os.path.join(valid, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return meta


def expected_ytb_frames(videos=YTB_VIDEOS):
    """{video: [frame stems the server scores]}: the union of the objects' frames."""
    out = {}
    for vid, spec in videos.items():
        start = min(spec['objects'].values())
        out[vid] = [f'{5 * t:05d}' for t in range(start, spec['n'])]
    return out


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def read_png(path):
    with Image.open(path) as img:
        img.load()
        return img.mode, img.getpalette(), np.array(img)


def assert_result_png(path, size, allowed_ids):
    mode, palette, arr = read_png(path)
    assert mode == 'P', f'{path}: mode {mode}'
    assert palette[:768] == _palette, f'{path}: not upstream\'s palette'
    assert arr.shape == size, f'{path}: {arr.shape} vs ground truth {size}'
    extra = set(np.unique(arr).tolist()) - set(allowed_ids)
    assert not extra, f'{path}: ids {extra} are not original object ids {sorted(allowed_ids)}'
    return arr


def mtimes(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            if n.endswith('.png'):
                p = os.path.join(dirpath, n)
                out[os.path.relpath(p, folder)] = os.stat(p).st_mtime_ns
    return out


def load_timing(eval_dir):
    with open(os.path.join(eval_dir, 'timing.json')) as f:
        return json.load(f)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


# ------------------------------------------------------------------------------------------
# DAVIS
# ------------------------------------------------------------------------------------------

def test_davis_12_objects_flip_scored_and_resumed(tmp_path):
    data = tmp_path / 'datasets'
    make_davis(str(data / 'DAVIS'))
    results = tmp_path / 'results'
    argv = COMMON + ['--dataset', 'davis2017', '--split', 'val', '--flip',
                     '--max_resolution', '150', '--data_path', str(data),
                     '--result_path', str(results)]
    assert main(argv) == 0

    name = f'davis2017_val_{EXP}_DeAOTT_{STAGE_NAME}_ckpt_test_flip'
    eval_dir = results / 'davis2017' / name
    res_root = eval_dir / 'Annotations' / '480p'
    gt_root = data / 'DAVIS' / 'Annotations' / '480p'
    for seq in ('bear', 'cows'):
        assert sorted(os.listdir(res_root / seq)) == [f'{t:05d}.png' for t in range(5)]
        for t in range(5):
            gt = np.array(Image.open(gt_root / seq / f'{t:05d}.png'))
            arr = assert_result_png(res_root / seq / f'{t:05d}.png', gt.shape, range(13))
            if t == 0:  # the given reference annotation is the first result
                np.testing.assert_array_equal(arr, gt)

    # J&F: the toolkit's CSVs in the results folder, full precision next to it.
    with open(res_root / 'global_results-val.csv') as f:
        header, values = f.read().strip().split('\n')
    assert header.split(',')[0] == 'J&F-Mean'
    assert all(0.0 <= float(v) <= 1.0 for v in values.split(',')[:3])
    with open(eval_dir / 'jf_scores-val.json') as f:
        scores = json.load(f)
    assert set(scores['per_object']) == {f'{s}_{k}' for s in ('bear', 'cows')
                                         for k in range(1, 13)}

    timing = load_timing(eval_dir)
    assert timing['this_run']['computed_sequences'] == ['bear', 'cows']
    for seq in ('bear', 'cows'):
        rec = timing['sequences'][seq]
        assert rec['timed_frames'] == 4 and rec['objects'] == 12
        assert rec['fps'] > 0 and rec['max_mem_gib'] > 0
    assert timing['overall']['all_frame_fps'] > 0

    # A second run computes nothing and rewrites no mask.
    before = mtimes(res_root)
    assert main(argv) == 0
    timing = load_timing(eval_dir)
    assert timing['this_run']['computed_sequences'] == []
    assert timing['this_run']['skipped_sequences'] == ['bear', 'cows']
    assert mtimes(res_root) == before

    # An interrupted sequence (no completion marker, a mask missing) is redone, alone.
    os.remove(eval_dir / 'progress' / 'cows.json')
    os.remove(res_root / 'cows' / '00003.png')
    assert main(argv) == 0
    timing = load_timing(eval_dir)
    assert timing['this_run']['computed_sequences'] == ['cows']
    after = mtimes(res_root)
    assert {k for k in after if after[k] != before.get(k)} == {
        os.path.join('cows', f'{t:05d}.png') for t in range(5)}


# ------------------------------------------------------------------------------------------
# YouTube-VOS
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ytb_run(tmp_path_factory):
    """One single-process YouTube-VOS 2019 run (1 thread), shared by the tests below."""
    tmp = tmp_path_factory.mktemp('ytb')
    data = tmp / 'datasets'
    make_youtubevos(str(data / 'YTB'))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = COMMON + ['--dataset', 'youtubevos2019', '--split', 'val', '--flip',
                         '--data_path', str(data), '--result_path', str(tmp / 'results')]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    name = f'youtubevos2019_val_{EXP}_DeAOTT_{STAGE_NAME}_ckpt_test_flip'
    return {'data': data, 'results': tmp / 'results', 'argv': argv, 'name': name,
            'eval_dir': tmp / 'results' / 'youtubevos2019' / name}


def test_youtubevos_masks_ids_and_new_objects(ytb_run):
    root = ytb_run['eval_dir'] / 'Annotations'
    valid = ytb_run['data'] / 'YTB' / '2019' / 'valid'
    expected = expected_ytb_frames()
    assert sorted(os.listdir(root)) == sorted(expected)
    for vid, stems in expected.items():
        assert sorted(os.listdir(root / vid)) == [s + '.png' for s in stems]
        objects = YTB_VIDEOS[vid]['objects']
        for stem in stems:
            t = int(stem) // 5
            known = [oid for oid, first in objects.items() if first <= t]
            arr = assert_result_png(root / vid / (stem + '.png'), YTB_SIZE, [0] + known)
            given_path = valid / 'Annotations' / vid / (stem + '.png')
            if given_path.exists():
                # Objects given at this frame are in the result exactly where they are given.
                given = np.array(Image.open(given_path))
                np.testing.assert_array_equal(arr[given > 0], given[given > 0])
                if t == min(objects.values()):
                    np.testing.assert_array_equal(arr, given)


def _reference_drive(cfg, model, seq):
    """Upstream's evaluator loop written out for one sequence: per augmentation an engine, logits
    decoded at the output size and flipped back before the softmax, the mean of the softmaxes,
    each engine fed its own argmax, given objects pasted and re-referenced. Returns
    {frame stem: (H, W) original ids}."""
    import torch.nn.functional as F
    from networks.engines import build_engine
    engines, out = [], {}
    for t in range(len(seq)):
        samples = seq[t]
        meta = samples[0]['meta']
        size = (meta['height'], meta['width'])
        lut = np.array(meta['obj_idx'])
        while len(engines) < len(samples):
            engines.append(build_engine(cfg.MODEL_ENGINE, phase='eval', aot_model=model,
                                        long_term_mem_gap=cfg.TEST_LONG_TERM_MEM_GAP,
                                        short_term_mem_skip=cfg.TEST_SHORT_TERM_MEM_SKIP))
        imgs = [s['current_img'][None] for s in samples]
        flips = [s['meta']['flip'] for s in samples]

        def engine_view(label, a):
            label = torch.flip(label, [3]) if flips[a] else label
            return F.interpolate(label, size=imgs[a].shape[-2:], mode='nearest')

        if t == 0:
            gt = samples[0]['current_label'][None].float()
            for a, e in enumerate(engines):
                e.add_reference_frame(imgs[a], engine_view(gt, a), frame_step=0,
                                      obj_nums=[meta['obj_num']])
            out[meta['current_name'][:-4]] = lut[gt[0, 0].long().numpy()]
            continue
        probs = []
        for a, e in enumerate(engines):
            e.match_propogate_one_frame(imgs[a])
            logit = e.decode_current_logits(size)
            if flips[a]:
                logit = torch.flip(logit, [3])
            probs.append(torch.softmax(logit, 1))
        ens = torch.argmax(sum(probs) / len(probs), 1, keepdim=True).float()
        own = [torch.argmax(p, 1, keepdim=True).float() for p in probs]
        if 'current_label' in samples[0]:
            gt = samples[0]['current_label'][None].float()
            ens = torch.where(gt > 0, gt, ens)
            own = [torch.where(gt > 0, gt, o) for o in own]
            for a, e in enumerate(engines):
                lab = engine_view(own[a], a)
                e.add_reference_frame(imgs[a], lab, obj_nums=[len(meta['obj_idx']) - 1],
                                      frame_step=t)
                e.decode_current_logits(size)
                e.update_memory(lab)
        else:
            for a, e in enumerate(engines):
                e.update_memory(engine_view(own[a], a))
        out[meta['current_name'][:-4]] = lut[ens[0, 0].long().numpy()]
    return out


def test_youtubevos_matches_reference_driver(ytb_run):
    from configs.default import build_config
    from dataloaders.eval_datasets import YOUTUBEVOS_Test
    from dataloaders.eval_transforms import build_eval_transform
    cfg = build_config('pre_ytb_dav', EXP, 'deaott')
    cfg.TEST_FLIP = True
    cfg.TEST_MAX_LONG_EDGE = 480 * 1.3 * 800 / 480
    with torch.random.fork_rng():
        torch.manual_seed(evaluator_module.TEST_CKPT_SEED)
        from networks.models import build_vos_model
        model = build_vos_model(cfg.MODEL_VOS, cfg).eval()
    dataset = YOUTUBEVOS_Test(root=str(ytb_run['data'] / 'YTB'), year=2019, split='val',
                              transform=build_eval_transform(cfg))
    compared = 0
    with torch.no_grad():
        for seq in dataset:
            for stem, ref in _reference_drive(cfg, model, seq).items():
                got = read_png(ytb_run['eval_dir'] / 'Annotations' / seq.seq_name /
                               (stem + '.png'))[2]
                np.testing.assert_array_equal(got, ref, err_msg=f'{seq.seq_name}/{stem}')
                compared += 1
    assert compared == sum(len(s) for s in expected_ytb_frames().values())


def test_youtubevos_zip_and_timing(ytb_run):
    zip_path = ytb_run['results'] / 'youtubevos2019' / (ytb_run['name'] + '.zip')
    expected = sorted(f'Annotations/{vid}/{s}.png'
                      for vid, stems in expected_ytb_frames().items() for s in stems)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == expected
        for entry in expected:
            with open(ytb_run['eval_dir'] / entry, 'rb') as f:
                assert zf.read(entry) == f.read()
    leftovers = [n for n in os.listdir(zip_path.parent) if n.endswith('.tmp')]
    assert not leftovers
    timing = load_timing(ytb_run['eval_dir'])
    assert set(timing['sequences']) == set(YTB_VIDEOS)
    assert timing['this_run']['gpu_num'] == 1


def test_youtubevos_two_processes_match_one(ytb_run, tmp_path):
    argv = list(ytb_run['argv'])
    argv[argv.index('--result_path') + 1] = str(tmp_path / 'results')
    assert main(argv + ['--gpu_num', '2']) == 0
    other = tmp_path / 'results' / 'youtubevos2019' / ytb_run['name']
    ranks = set()
    for vid, stems in expected_ytb_frames().items():
        for stem in stems:
            rel = os.path.join('Annotations', vid, stem + '.png')
            np.testing.assert_array_equal(read_png(other / rel)[2],
                                          read_png(ytb_run['eval_dir'] / rel)[2])
        ranks.add(load_timing(other)['sequences'][vid]['rank'])
    assert load_timing(other)['this_run']['gpu_num'] == 2
    zip_path = tmp_path / 'results' / 'youtubevos2019' / (ytb_run['name'] + '.zip')
    with zipfile.ZipFile(zip_path) as zf:
        assert len(zf.namelist()) == sum(len(s) for s in expected_ytb_frames().values())


def test_latest_checkpoint_of_the_experiment_is_loaded(ytb_run, tmp_path, monkeypatch):
    """Without --ckpt_path the latest save_step_<N>.pth of result/<exp>/<stage>/ckpt is used and
    named in the folder; with the same weights as the random-weight run the masks are equal."""
    from configs.default import build_config
    from networks.models import build_vos_model
    from utils.checkpoint import save_network
    cfg = build_config('pre_ytb_dav', EXP, 'deaott')
    with torch.random.fork_rng():
        torch.manual_seed(evaluator_module.TEST_CKPT_SEED)
        model = build_vos_model(cfg.MODEL_VOS, cfg)
    monkeypatch.chdir(tmp_path)  # DIR_ROOT is './'
    save_network(model, 7, cfg.DIR_CKPT)
    save_network(model, 3, cfg.DIR_CKPT)
    argv = [a for a in ytb_run['argv'] if a not in ('--ckpt_path', 'test')]
    argv[argv.index('--result_path') + 1] = str(tmp_path / 'results')
    assert main(argv) == 0
    name = ytb_run['name'].replace('_ckpt_test', '_ckpt_7')
    other = tmp_path / 'results' / 'youtubevos2019' / name
    for vid, stems in expected_ytb_frames().items():
        for stem in stems:
            rel = os.path.join('Annotations', vid, stem + '.png')
            np.testing.assert_array_equal(read_png(other / rel)[2],
                                          read_png(ytb_run['eval_dir'] / rel)[2])


def test_youtubevos_all_frames_writes_sparse_set(tmp_path):
    videos = {'vid_c': {'n': 3, 'objects': {4: 0, 9: 1}}}
    data = tmp_path / 'datasets'
    make_youtubevos(str(data / 'YTB'), year=2018, dense=True, videos=videos)
    argv = COMMON + ['--dataset', 'youtubevos2018', '--split', 'val_all_frames',
                     '--data_path', str(data), '--result_path', str(tmp_path / 'results')]
    assert main(argv) == 0
    base = tmp_path / 'results' / 'youtubevos2018'
    name = f'youtubevos2018_val_all_frames_{EXP}_DeAOTT_{STAGE_NAME}_ckpt_test'
    dense = sorted(os.listdir(base / name / 'Annotations' / 'vid_c'))
    assert dense == [f'{t:05d}.png' for t in range(11)]
    with zipfile.ZipFile(base / (name + '_sparse.zip')) as zf:
        assert sorted(zf.namelist()) == [f'Annotations/vid_c/{t:05d}.png' for t in (0, 5, 10)]
    with zipfile.ZipFile(base / (name + '.zip')) as zf:
        assert len(zf.namelist()) == 11
    for t in (0, 5, 10):
        rel = os.path.join('Annotations', 'vid_c', f'{t:05d}.png')
        a = assert_result_png(base / (name + '_sparse') / rel, YTB_SIZE, [0, 4, 9])
        np.testing.assert_array_equal(a, read_png(base / name / rel)[2])


# ------------------------------------------------------------------------------------------
# Upstream bug 4: the object count at an annotated frame
# ------------------------------------------------------------------------------------------

def test_new_object_count_keeps_unpredicted_highest_id(tmp_path, monkeypatch):
    """Frame 2 re-annotates object 1 only, and object 3 (the highest id) is not predicted
    there. Upstream would set the count to max(prediction) = 2 and mask object 3 from then on;
    the count must stay 3."""
    rng = np.random.default_rng(3)
    root = tmp_path / 'custom'
    ids = {1: 1, 2: 4, 3: 6}  # contiguous -> original
    for t in range(5):
        boxes = {ids[k]: (4 + 16 * (k - 1), 6 + 30 * (k - 1) + t, 14, 24) for k in (1, 2, 3)}
        img, mask = _blob_frame(rng, 64, 112, boxes)
        _write_jpg(str(root / 'JPEGImages' / 'seq' / f'{t:05d}.jpg'), img)
        if t == 0:
            save_mask(mask, str(root / 'Annotations' / 'seq' / '00000.png'))
        if t == 2:
            save_mask(np.where(mask == ids[1], mask, 0).astype(np.uint8),
                      str(root / 'Annotations' / 'seq' / '00002.png'))

    refs, decoded = [], []
    real_build = evaluator_module.build_engine

    def build(*args, **kwargs):
        engine = real_build(*args, **kwargs)
        add, decode = engine.add_reference_frame, engine.decode_current_logits

        def add_reference_frame(img, mask, obj_nums, frame_step=-1):
            refs.append((frame_step, list(obj_nums)))
            return add(img, mask, obj_nums, frame_step=frame_step)

        def decode_current_logits(output_size=None, live_only=False):
            logits = decode(output_size)   # every channel: the check below reads channel 3
            step = engine.aot_engines[0].frame_step
            decoded.append((step, engine.obj_nums, float(logits[:, 3].max())))
            if step == 2:  # object 3 is not predicted at the annotated frame
                logits = logits.clone()
                logits[:, 3] = -1e4
            return logits

        engine.add_reference_frame = add_reference_frame
        engine.decode_current_logits = decode_current_logits
        return engine

    monkeypatch.setattr(evaluator_module, 'build_engine', build)
    argv = COMMON + ['--dataset', 'custom', '--flip', '--data_path', str(root),
                     '--result_path', str(tmp_path / 'results')]
    assert main(argv) == 0
    res = tmp_path / 'results' / 'custom' / f'custom_val_{EXP}_DeAOTT_{STAGE_NAME}_ckpt_test_flip'
    frame2 = read_png(res / 'Annotations' / 'seq' / '00002.png')[2]
    assert ids[3] not in np.unique(frame2)  # the situation that triggers upstream's bug
    assert [r for r in refs if r[0] == 2] == [(2, [3]), (2, [3])]  # both augmentations
    later = [d for d in decoded if d[0] > 2]
    assert later and all(n == 3 and top > -1e4 for _, n, top in later)  # channel 3 unmasked
    assert set(np.unique(frame2)) <= {0, 1, 4, 6}


@pytest.mark.parametrize('lt_max', [None, 3])
def test_eval_long_term_cap_keeps_memory_flat(tmp_path, monkeypatch, lt_max):
    """``--lt_max`` (TEST_LONG_TERM_MEM_MAX) bounds the evaluator's memory on a long video:
    with a gap of 1 every frame is written, yet the stored frames and bytes stop growing at
    the cap; without it they grow by one frame per frame (upstream's protocol)."""
    rng = np.random.default_rng(5)
    root = tmp_path / 'custom'
    n = 12
    for t in range(n):
        img, mask = _blob_frame(rng, 48, 80, {1: (8, 10 + t, 14, 20)})
        _write_jpg(str(root / 'JPEGImages' / 'seq' / f'{t:05d}.jpg'), img)
        if t == 0:
            save_mask(mask, str(root / 'Annotations' / 'seq' / '00000.png'))

    stored = []
    real_build = evaluator_module.build_engine

    def build(*args, **kwargs):
        engine = real_build(*args, **kwargs)
        update = engine.update_memory

        def update_memory(mask, **kw):
            update(mask, **kw)
            mem = engine.aot_engines[0].memory
            size = sum(t.numel() * t.element_size() for frames in mem.long_term
                       for e in frames for t in (e.key, e.value, e.id_value) if t is not None)
            stored.append((mem.num_long_term_frames, size))

        engine.update_memory = update_memory
        return engine

    monkeypatch.setattr(evaluator_module, 'build_engine', build)
    argv = COMMON + ['--dataset', 'custom', '--lt_gap', '1', '--data_path', str(root),
                     '--result_path', str(tmp_path / 'results')]
    if lt_max:
        argv += ['--lt_max', str(lt_max)]
    assert main(argv) == 0
    frames = [f for f, _ in stored]
    assert len(frames) == n - 1
    if lt_max is None:
        assert frames == list(range(2, n + 1))          # reference + one per frame
    else:
        assert max(frames) == lt_max and frames[-1] == lt_max
        sizes = [b for f, b in stored if f == lt_max]
        assert len(set(sizes)) == 1                     # flat bytes once the cap is reached
    res = tmp_path / 'results' / 'custom'
    settings = [json.load(open(os.path.join(d, 'settings.json'))) for d, _, fs in os.walk(res)
                if 'settings.json' in fs]
    assert settings and settings[0]['long_term_mem_max'] == lt_max


# ------------------------------------------------------------------------------------------
# Names and errors
# ------------------------------------------------------------------------------------------

def test_eval_name_rule():
    from configs.default import build_config
    cfg = build_config('pre_ytb_dav', 'default', 'r50_deaotl')
    cfg.TEST_DATASET, cfg.TEST_DATASET_SPLIT = 'youtubevos2018', 'val'
    cfg.TEST_EMA, cfg.TEST_FLIP, cfg.TEST_MULTISCALE = True, True, [1.0, 1.3]
    assert evaluator_module.eval_name(cfg, '100000') == \
        'youtubevos2018_val_default_R50_DeAOTL_PRE_YTB_DAV_ckpt_100000_ema_flip_ms_1dot0_1dot3'


def test_missing_checkpoint_and_data_folder_name_the_path(tmp_path, capsys):
    data = tmp_path / 'datasets'
    make_youtubevos(str(data / 'YTB'), videos={'v': {'n': 2, 'objects': {1: 0}}})
    missing = tmp_path / 'nope.pth'
    argv = [a if a != 'test' else str(missing) for a in COMMON]
    assert main(argv + ['--dataset', 'youtubevos2019', '--data_path', str(data)]) == 1
    assert str(missing) in capsys.readouterr().err
    # From the repo root as a script, with a data folder that does not exist.
    proc = subprocess.run([sys.executable, 'tools/eval.py', '--dataset', 'davis2017',
                           '--ckpt_path', 'test', '--data_path', str(tmp_path / 'absent'),
                           '--device', 'cpu'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert str(tmp_path / 'absent') in proc.stderr
