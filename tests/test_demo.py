"""tools/demo.py end to end on generated inputs: outputs, mask formats, errors, the sample."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tools import demo
from utils.image import DAVIS_PALETTE, _palette
from utils.video_io import VideoWriter

H, W = 96, 160


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path):
    # No trained weights unless a test puts some there; one thread (tiny tensors, and the
    # development machines are shared).
    empty = tmp_path / 'no_pretrain'
    empty.mkdir()
    monkeypatch.setattr(demo, 'PRETRAIN_DIR', str(empty))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frames_of(n, h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (h, w, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        f = np.roll(base, 2 * i, axis=1).copy()
        f[20:50, 10 + 3 * i:50 + 3 * i] = (220, 30, 30)
        out.append(f)
    return out


def truth_ids(h=H, w=W):
    """Non-contiguous ids {2, 7}."""
    ids = np.zeros((h, w), np.uint8)
    ids[20:50, 10:50] = 2
    ids[55:90, 80:150] = 7
    return ids


def save_palette(ids, path, palette=_palette):
    img = Image.fromarray(ids.astype(np.uint8), mode='L').convert('P')
    img.putpalette(palette)
    img.save(path)


def make_video(path, n):
    with VideoWriter(str(path), fps=10, size=(H, W)) as writer:
        for f in frames_of(n):
            writer.write(f)


def run(argv, capsys=None):
    rc = demo.main([str(a) for a in argv] + ['--device', 'cpu'])
    err = capsys.readouterr().err if capsys is not None else ''
    return rc, err


def read_png(path):
    with Image.open(path) as img:
        return img.mode, img.getpalette(), np.array(img)


def count_video_frames(path):
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f'{path} does not open'
    n, size = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, frame.shape[:2]
    cap.release()
    return n, size


def test_video_file_writes_every_png_and_a_playable_mp4(tmp_path, capsys):
    n = 10
    video, mask, out = tmp_path / 'clip.mp4', tmp_path / 'first.png', tmp_path / 'out'
    make_video(video, n)
    save_palette(truth_ids(), mask)
    rc, err = run(['--input', video, '--mask', mask, '--output', out], capsys)
    assert rc == 0, err
    assert 'UNTRAINED' in err and 'MEANINGLESS' in err

    pngs = sorted(os.listdir(out / 'pred_masks' / 'clip'))
    assert pngs == [f'{i:05d}.png' for i in range(n)]
    for i, name in enumerate(pngs):
        mode, palette, ids = read_png(out / 'pred_masks' / 'clip' / name)
        assert mode == 'P' and ids.shape == (H, W)
        assert palette[:len(_palette)] == _palette
        assert set(np.unique(ids)) <= {0, 2, 7}
        if i == 0:
            np.testing.assert_array_equal(ids, truth_ids())
    frames, size = count_video_frames(out / 'clip_overlay.mp4')
    assert frames == n and size == (H, W)

    summary = json.loads((out / 'summary.json').read_text())
    assert summary['frames'] == n and summary['objects'] == [2, 7]
    assert summary['model'] == 'deaott_gda' and summary['checkpoint'] is None
    assert summary['weights_trained'] is False
    assert summary['fps'] > 0 and summary['peak_memory_mb'] > 0
    assert summary['long_term_mem_max'] == 8
    assert not [f for f in os.listdir(out) if f.startswith('.')], 'temporary files left behind'


def test_frame_folder_with_masks_named_by_frame(tmp_path, capsys):
    n, k = 8, 5
    frames_dir, masks_dir, out = tmp_path / 'walk', tmp_path / 'masks', tmp_path / 'out'
    frames_dir.mkdir()
    masks_dir.mkdir()
    # Unpadded names: frame_10 must come after frame_9.
    names = [f'frame_{i + 5}' for i in range(n)]
    for name, f in zip(names, frames_of(n)):
        cv2.imwrite(str(frames_dir / f'{name}.jpg'), f[:, :, ::-1])
    first = np.zeros((H, W), np.uint8)
    first[20:50, 10:50] = 3
    later = np.zeros((H, W), np.uint8)
    later[60:90, 100:150] = 200
    save_palette(first, masks_dir / f'{names[0]}.png')
    save_palette(later, masks_dir / f'{names[k]}.png')
    rc, err = run(['--input', frames_dir, '--mask', masks_dir, '--output', out,
                   '--max_memory_frames', '2', '--lt_gap', '1'], capsys)
    assert rc == 0, err
    written = sorted(os.listdir(out / 'pred_masks' / 'walk'))
    assert sorted(p[:-4] for p in written) == sorted(names)
    for i, name in enumerate(names):
        _, _, ids = read_png(out / 'pred_masks' / 'walk' / f'{name}.png')
        assert ids.shape == (H, W)
        if i < k:
            assert 200 not in ids, f'{name}: object 200 before the frame it was given on'
        assert set(np.unique(ids)) <= {0, 3, 200}
    _, _, at_k = read_png(out / 'pred_masks' / 'walk' / f'{names[k]}.png')
    assert np.all(at_k[later > 0] == 200)
    assert count_video_frames(out / 'walk_overlay.mp4') == (n, (H, W))
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['objects'] == [3, 200] and summary['frames'] == n


def _variants(tmp_path):
    """(group, path): mask files that must all give the same id map within a group."""
    ids = truth_ids()
    multi, binary = [], []
    save_palette(ids, tmp_path / 'palette.png')
    multi.append(tmp_path / 'palette.png')
    Image.fromarray(ids, mode='L').save(tmp_path / 'gray_ids.png')
    multi.append(tmp_path / 'gray_ids.png')
    colours = np.asarray(DAVIS_PALETTE, np.uint8).reshape(-1, 3)
    rgb = colours[ids]
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    multi.append(tmp_path / 'rgb.png')
    # Anti-aliased: each border pixel blends 30% of a neighbour's colour in (nearest: its own).
    blended = rgb.astype(np.float32)
    border = np.zeros((H, W), bool)
    border[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    shifted = np.roll(rgb, -1, axis=1).astype(np.float32)
    blended[border] = 0.7 * blended[border] + 0.3 * shifted[border]
    Image.fromarray(np.rint(blended).astype(np.uint8)).save(tmp_path / 'rgb_aa.png')
    multi.append(tmp_path / 'rgb_aa.png')

    fg = (ids > 0).astype(np.uint8)
    save_palette(fg, tmp_path / 'bin_palette.png')
    Image.fromarray(fg * 255, mode='L').save(tmp_path / 'bin_0_255.png')
    Image.fromarray(fg, mode='L').save(tmp_path / 'bin_0_1.png')
    Image.fromarray(np.repeat(fg[..., None] * 255, 3, axis=2)).save(tmp_path / 'bin_rgb.png')
    binary += [tmp_path / f for f in ('bin_palette.png', 'bin_0_255.png', 'bin_0_1.png',
                                      'bin_rgb.png')]
    return [('multi', ids, multi), ('binary', fg, binary)]


@pytest.mark.filterwarnings('ignore:.*anti-aliased edge px snapped')
def test_every_mask_format_gives_the_same_label_maps(tmp_path, capsys):
    n = 3
    video = tmp_path / 'v.mp4'
    make_video(video, n)
    for group, truth, paths in _variants(tmp_path):
        outputs = []
        for path in paths:
            out = tmp_path / f'out_{path.stem}'
            rc, err = run(['--input', video, '--mask', path, '--output', out], capsys)
            assert rc == 0, f'{path.name}: {err}'
            maps = [read_png(out / 'pred_masks' / 'v' / f'{i:05d}.png')[2] for i in range(n)]
            np.testing.assert_array_equal(maps[0], truth, err_msg=path.name)
            outputs.append((path.name, maps))
        for name, maps in outputs[1:]:
            for i in range(n):
                np.testing.assert_array_equal(maps[i], outputs[0][1][i],
                                              err_msg=f'{group}: {name} frame {i}')


def test_clear_errors_and_no_silent_overwrite(tmp_path, capsys):
    video, mask = tmp_path / 'clip.mp4', tmp_path / 'm.png'
    make_video(video, 3)
    save_palette(truth_ids(), mask)

    small = tmp_path / 'small.png'
    save_palette(np.ones((H // 2, W // 2), np.uint8), small)
    rc, err = run(['--input', video, '--mask', small, '--output', tmp_path / 'o1'], capsys)
    assert rc == 1 and 'small.png' in err and 'frame' in err
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG garbage')
    rc, err = run(['--input', video, '--mask', broken, '--output', tmp_path / 'o2'], capsys)
    assert rc == 1 and 'broken.png' in err
    bad_video = tmp_path / 'bad.mp4'
    bad_video.write_bytes(b'\x00' * 64)
    rc, err = run(['--input', bad_video, '--mask', mask, '--output', tmp_path / 'o3'], capsys)
    assert rc == 1 and 'bad.mp4' in err
    stray = tmp_path / 'stray'
    stray.mkdir()
    save_palette(truth_ids(), stray / 'not_a_frame.png')
    rc, err = run(['--input', video, '--mask', stray, '--output', tmp_path / 'o4'], capsys)
    assert rc == 1 and 'not_a_frame.png' in err
    rc, err = run(['--input', video, '--output', tmp_path / 'o5'], capsys)
    assert rc == 1 and '--mask' in err
    for o in ('o1', 'o2', 'o3', 'o4', 'o5'):
        assert not (tmp_path / o / 'pred_masks').exists()

    out = tmp_path / 'out'
    assert run(['--input', video, '--mask', mask, '--output', out], capsys)[0] == 0
    before = (out / 'summary.json').read_bytes()
    rc, err = run(['--input', video, '--mask', mask, '--output', out], capsys)
    assert rc == 1 and 'already exist' in err and '--overwrite' in err
    assert (out / 'summary.json').read_bytes() == before
    rc, err = run(['--input', video, '--mask', mask, '--output', out, '--overwrite'], capsys)
    assert rc == 0, err


def test_finds_trained_weights_in_pretrain_models(tmp_path, capsys, monkeypatch):
    from configs.default import build_config
    from networks.models import build_vos_model
    cfg = build_config('pre_ytb_dav', 'demo', 'deaott')
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    folder = tmp_path / 'pretrain'
    folder.mkdir()
    ckpt = folder / 'DeAOTT_PRE_YTB_DAV.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    monkeypatch.setattr(demo, 'PRETRAIN_DIR', str(folder))
    video, mask, out = tmp_path / 'c.mp4', tmp_path / 'm.png', tmp_path / 'out'
    make_video(video, 2)
    save_palette(truth_ids(), mask)
    rc, err = run(['--input', video, '--mask', mask, '--output', out, '--model', 'deaott'],
                  capsys)
    assert rc == 0, err
    assert 'UNTRAINED' not in err
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['weights_trained'] is True and summary['checkpoint'] == str(ckpt)


def test_sample_is_deterministic(tmp_path):
    a = demo.make_sample(str(tmp_path / 'a'), num_frames=4, size=(48, 80))
    b = demo.make_sample(str(tmp_path / 'b'), num_frames=4, size=(48, 80))
    assert read_png(a[1])[2].tolist() == read_png(b[1])[2].tolist()
    assert set(np.unique(read_png(a[1])[2])) == {0, 1, 2}
    # every frame's ground truth is written, and frame 0's equals the first-frame mask
    assert sorted(os.listdir(a[2])) == [f'{i:05d}.png' for i in range(4)]
    assert np.array_equal(read_png(os.path.join(a[2], '00000.png'))[2], read_png(a[1])[2])
    ca, cb = cv2.VideoCapture(a[0]), cv2.VideoCapture(b[0])
    for _ in range(4):
        (oka, fa), (okb, fb) = ca.read(), cb.read()
        assert oka and okb and np.array_equal(fa, fb)


def test_no_arguments_runs_the_sample(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, 'SAMPLE_FRAMES', 6)
    monkeypatch.setattr(demo, 'SAMPLE_SIZE', (64, 112))
    out = tmp_path / 'demo_output'
    rc, err = run(['--output', out], capsys)
    assert rc == 0, err
    assert 'UNTRAINED' in err
    assert len(os.listdir(out / 'pred_masks' / 'sample')) == 6
    assert count_video_frames(out / 'sample_overlay.mp4') == (6, (64, 112))
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['objects'] == [1, 2] and summary['weights_trained'] is False
    assert 0 <= summary['sample_scores']['J&F'] <= 1 and 'scikit-image' in summary['sample_licence']


@pytest.mark.slow
def test_default_sample_full_size(tmp_path, capsys):
    out = tmp_path / 'demo_output'
    rc, err = run(['--output', out], capsys)
    assert rc == 0, err
    names = sorted(os.listdir(out / 'pred_masks' / 'sample'))
    assert names == [f'{i:05d}.png' for i in range(demo.SAMPLE_FRAMES)]
    assert count_video_frames(out / 'sample_overlay.mp4') == (demo.SAMPLE_FRAMES,
                                                             demo.SAMPLE_SIZE)
