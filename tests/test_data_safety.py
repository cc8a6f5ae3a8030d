"""Never lose or silently corrupt a user's data (issue 14): one test (or a few) per item.

Each test drives the tool the way a careless user would and checks what is on disk afterwards.
"""
import json
import os
import stat

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests import conftest
# _setup: the demo tests' autouse fixture (no trained weights, one thread), applied here too.
from tests.test_demo import (H, W, _setup, frames_of, make_video, read_png,  # noqa: F401
                             save_palette, truth_ids)
from tools import demo
from utils.video_io import FrameSourceError, open_frames


def run_demo(argv, capsys):
    rc = demo.main([str(a) for a in argv] + ['--device', 'cpu'])
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def write_frames(folder, frames, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        name = names[i] if names else f'{i:05d}'
        cv2.imwrite(str(folder / f'{name}.jpg'), f[:, :, ::-1])


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


# -- 1: --overwrite replaces results only once the new run has succeeded ------------------------

def test_failed_overwrite_leaves_previous_results_untouched(tmp_path, capsys, monkeypatch):
    video, mask, out = tmp_path / 'clip.mp4', tmp_path / 'm.png', tmp_path / 'out'
    make_video(video, 6)
    save_palette(truth_ids(), mask)
    assert run_demo(['--input', video, '--mask', mask, '--output', out], capsys)[0] == 0
    before = snapshot(out)
    assert len([k for k in before if k.startswith('pred_masks')]) == 6

    real_save = demo.save_mask
    calls = []

    def failing_save(label, path):
        calls.append(path)
        if len(calls) == 3:
            raise FrameSourceError(f'{path}: simulated failure on the third frame')
        return real_save(label, path)

    monkeypatch.setattr(demo, 'save_mask', failing_save)
    rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', out, '--overwrite',
                           '--lt_gap', '2'], capsys)
    assert rc == 1 and 'simulated failure' in err
    assert snapshot(out) == before, 'a failed --overwrite run changed the earlier results'
    assert not [f for f in os.listdir(out) if f.startswith('.')], 'staging folder left behind'

    # A successful --overwrite with a shorter video replaces everything, stale masks included.
    monkeypatch.setattr(demo, 'save_mask', real_save)
    short = tmp_path / 'short' / 'clip.mp4'
    short.parent.mkdir()
    make_video(short, 3)
    rc, err, _ = run_demo(['--input', short, '--mask', mask, '--output', out, '--overwrite'],
                          capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out / 'pred_masks' / 'clip')) == [f'{i:05d}.png' for i in range(3)]
    assert json.loads((out / 'summary.json').read_text())['frames'] == 3
    assert not [f for f in os.listdir(out) if f.startswith('.')]


# -- 2: an --output that is or contains an input is refused ------------------------------------

def test_output_containing_or_equal_to_an_input_is_refused(tmp_path, capsys):
    out = tmp_path / 'out'
    frames = out / 'pred_masks' / 'clip'   # the input sits where the results would go
    write_frames(frames, frames_of(3))
    masks = out / 'given'
    masks.mkdir()
    save_palette(truth_ids(), masks / '00000.png')
    inputs_before = snapshot(out)
    for output in (out, frames):
        rc, err, _ = run_demo(['--input', frames, '--mask', masks / '00000.png', '--output',
                               output, '--overwrite'], capsys)
        assert rc == 1 and 'contains the input' in err and str(frames) in err
    # The mask (folder or file) counts as an input too.
    elsewhere = tmp_path / 'frames'
    write_frames(elsewhere, frames_of(3))
    rc, err, _ = run_demo(['--input', elsewhere, '--mask', masks, '--output', out,
                           '--overwrite'], capsys)
    assert rc == 1 and 'contains the mask' in err
    assert snapshot(out) == inputs_before, 'an input was touched'


# -- 3: eval result folders are named by checkpoint content and never silently reused -----------

def _eval_cfg(tmp_path, ckpt, *extra):
    from tools.eval import build_parser, config_from_args
    from tests.test_eval_e2e import make_youtubevos
    data = tmp_path / 'datasets'
    if not (data / 'YTB').exists():
        make_youtubevos(str(data / 'YTB'), videos={'v': {'n': 2, 'objects': {1: 0}}})
    args = build_parser().parse_args(
        ['--exp_name', 'safety', '--stage', 'pre_ytb_dav', '--model', 'deaott', '--ckpt_path',
         str(ckpt), '--dataset', 'youtubevos2019', '--data_path', str(data), '--result_path',
         str(tmp_path / 'results'), '--device', 'cpu', '--workers', '0', *extra])
    return config_from_args(args)


def test_eval_folders_are_named_by_checkpoint_and_other_settings_are_refused(tmp_path, capsys):
    import hashlib

    from networks.managers.evaluator import Evaluator
    from tools.eval import main
    a, b = tmp_path / 'A.pth', tmp_path / 'B.pth'
    torch.save({'state_dict': {'w': torch.zeros(3)}}, a)
    torch.save({'state_dict': {'w': torch.ones(3)}}, b)
    ev_a = Evaluator(_eval_cfg(tmp_path, a), device='cpu', verbose=False)
    ev_b = Evaluator(_eval_cfg(tmp_path, b), device='cpu', verbose=False)
    sha_a = hashlib.sha256(a.read_bytes()).hexdigest()[:8]
    assert ev_a.eval_name.endswith(f'_ckpt_A_{sha_a}')
    assert ev_a.eval_dir != ev_b.eval_dir and 'unknown' not in ev_a.eval_dir

    ev_a.claim_result_folder()
    recorded = json.loads((tmp_path / 'results' / 'youtubevos2019' / ev_a.eval_name /
                           'settings.json').read_text())
    assert recorded['checkpoint']['sha256'] == hashlib.sha256(a.read_bytes()).hexdigest()
    Evaluator(_eval_cfg(tmp_path, a), device='cpu', verbose=False).claim_result_folder()  # resume

    # Same folder name, another memory gap: refused, through the CLI too, until --overwrite.
    other = Evaluator(_eval_cfg(tmp_path, a, '--lt_gap', '3'), device='cpu', verbose=False)
    assert other.eval_dir == ev_a.eval_dir
    with pytest.raises(ValueError, match='other settings.*long_term_mem_gap'):
        other.claim_result_folder()
    argv = ['--exp_name', 'safety', '--stage', 'pre_ytb_dav', '--model', 'deaott',
            '--ckpt_path', str(a), '--dataset', 'youtubevos2019', '--data_path',
            str(tmp_path / 'datasets'), '--result_path', str(tmp_path / 'results'),
            '--device', 'cpu', '--workers', '0', '--lt_gap', '3']
    assert main(argv) == 1
    assert '--overwrite' in capsys.readouterr().err
    other.claim_result_folder(overwrite=True)
    assert json.loads((tmp_path / 'results' / 'youtubevos2019' / ev_a.eval_name /
                       'settings.json').read_text())['long_term_mem_gap'] == 3


# -- 4: a damaged video that decodes only in part fails (or is recorded) ------------------------

def _damaged_video(tmp_path, n=10):
    video = tmp_path / 'damaged.mp4'
    make_video(video, n)
    data = bytearray(video.read_bytes())
    start, end = data.find(b'mdat'), data.find(b'moov')
    cut = start + int((end - start) * 0.4)
    data[cut:end - 8] = b'\x00' * (end - 8 - cut)   # the frame data after frame 0 is lost
    video.write_bytes(bytes(data))
    source = open_frames(video)
    assert len(source) == n and sum(1 for _ in source.iter_frames()) < n
    return video


def test_partly_decodable_video_fails_unless_allowed_and_is_recorded(tmp_path, capsys):
    video = _damaged_video(tmp_path)
    mask = tmp_path / 'm.png'
    save_palette(truth_ids(), mask)
    out = tmp_path / 'out'
    rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', out], capsys)
    assert rc == 1 and 'damaged.mp4' in err and 'of the 10 frames' in err
    assert not (out / 'pred_masks').exists() and not (out / 'summary.json').exists()

    rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', out,
                           '--allow_short_video'], capsys)
    assert rc == 0 and 'WARNING' in err and 'of the 10 frames' in err
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['frames'] < summary['frames_announced'] == 10
    assert any('of the 10 frames' in w for w in summary['warnings'])


# -- 5: 255 in a palette mask is void (background) in the demo, the API and eval ---------------

def test_palette_void_255_is_background_everywhere(tmp_path, capsys):
    from networks.managers.segmenter import VideoObjectSegmenter
    from utils.image import MaskWarning, read_mask
    ids = truth_ids()
    ids[0:10, :] = 255                      # DAVIS-2017 void border
    mask = tmp_path / 'void.png'
    save_palette(ids, mask)
    with pytest.warns(MaskWarning, match='void.png.*void'):
        read = read_mask(mask)
    assert 255 not in read and set(np.unique(read)) == {0, 2, 7}
    # A grayscale 0/255 mask is still a binary mask (object 1), not void.
    Image.fromarray(((ids == 2) * 255).astype(np.uint8), mode='L').save(tmp_path / 'bin.png')
    assert set(np.unique(read_mask(tmp_path / 'bin.png'))) == {0, 1}

    video, out = tmp_path / 'clip.mp4', tmp_path / 'out'
    make_video(video, 3)
    rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', out], capsys)
    assert rc == 0, err
    assert json.loads((out / 'summary.json').read_text())['objects'] == [2, 7]
    for i in range(3):
        assert 255 not in read_png(out / 'pred_masks' / 'clip' / f'{i:05d}.png')[2]

    seg = VideoObjectSegmenter('deaott', ckpt_path=None, device='cpu')
    seg.open(video)
    with pytest.warns(MaskWarning):
        assert seg.add_mask(0, mask) == [2, 7]

    # Eval reads the same file the same way.
    from dataloaders.eval_datasets import CustomTest
    root = tmp_path / 'custom'
    write_frames(root / 'JPEGImages' / 'seq', frames_of(2))
    (root / 'Annotations' / 'seq').mkdir(parents=True)
    save_palette(ids, root / 'Annotations' / 'seq' / '00000.png')
    with pytest.warns(UserWarning, match='void'):
        seq = CustomTest(root=str(root))[0]
    assert [int(v) for v in seq.obj_indices[0]] == [0, 2, 7]


# -- 6: masks in a folder map to frames by name or number, never by position --------------------

def test_mask_folder_maps_by_frame_number_not_position(tmp_path, capsys):
    frames = tmp_path / 'frames'
    names = ['00000', '00002', '00004', '00006', '00008']
    write_frames(frames, frames_of(5), names)
    masks = tmp_path / 'masks'
    masks.mkdir()
    save_palette(truth_ids(), masks / '0.png')
    later = np.zeros((H, W), np.uint8)
    later[60:90, 100:150] = 9
    save_palette(later, masks / '4.png')
    source = open_frames(frames)
    found = demo.mask_files(str(masks), source)
    assert {source.names[i]: os.path.basename(p) for i, p in found.items()} == \
        {'00000': '0.png', '00004': '4.png'}

    out = tmp_path / 'out'
    rc, err, stdout = run_demo(['--input', frames, '--mask', masks, '--output', out], capsys)
    assert rc == 0, err
    assert '4.png -> 00004' in stdout
    assert 9 not in read_png(out / 'pred_masks' / 'frames' / '00002.png')[2]
    assert np.all(read_png(out / 'pred_masks' / 'frames' / '00004.png')[2][later > 0] == 9)

    save_palette(later, masks / '3.png')   # no frame 3
    with pytest.raises(demo.DemoError, match='3.png.*matches no frame'):
        demo.mask_files(str(masks), source)


# -- 7: truncated checkpoints: one loader, clear errors, resume falls back -----------------------

def _truncated(tmp_path, name='trunc.pth'):
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'w': torch.zeros(4096)}}, good)
    path = tmp_path / name
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    return path


def test_truncated_checkpoint_error_names_the_file_without_torch_hint(tmp_path, capsys):
    from utils.checkpoint import CheckpointReadError, read_state_dict
    path = _truncated(tmp_path)
    with pytest.raises(CheckpointReadError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and 'truncated' in msg
    assert 'weights_only' not in msg and 'PytorchStreamReader' not in msg
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint at all' * 10)
    with pytest.raises(CheckpointReadError, match='junk.pth') as info:
        read_state_dict(junk)
    assert 'weights_only' not in str(info.value)

    video, mask = tmp_path / 'clip.mp4', tmp_path / 'm.png'
    make_video(video, 2)
    save_palette(truth_ids(), mask)
    rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', tmp_path / 'out',
                           '--model', 'deaott', '--ckpt_path', path], capsys)
    assert rc == 1 and str(path) in err and 'Traceback' not in err and 'weights_only' not in err

    from tools.eval import main
    from tests.test_eval_e2e import make_youtubevos
    make_youtubevos(str(tmp_path / 'datasets' / 'YTB'), videos={'v': {'n': 2, 'objects': {1: 0}}})
    rc = main(['--stage', 'pre_ytb_dav', '--model', 'deaott', '--ckpt_path', str(path),
               '--dataset', 'youtubevos2019', '--data_path', str(tmp_path / 'datasets'),
               '--result_path', str(tmp_path / 'results'), '--device', 'cpu', '--workers', '0'])
    err = capsys.readouterr().err
    assert rc == 1 and str(path) in err and 'weights_only' not in err


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    from tests.test_trainer import TinyClips, make_trainer, tiny_cfg
    from utils.checkpoint import checkpoint_path
    cfg = tiny_cfg(tmp_path / 'run')
    trainer = make_trainer(cfg, TinyClips(n=2))
    trainer.save_checkpoint(1)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.save_checkpoint(2)
    trainer.close()
    newest = checkpoint_path(cfg.DIR_CKPT, 2)
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) // 3)
    capsys.readouterr()
    resumed = make_trainer(tiny_cfg(tmp_path / 'run'), TinyClips(n=2))
    logged = capsys.readouterr()
    assert resumed.step == 1
    assert f'skipping {newest}' in logged.out + logged.err
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    resumed.close()


# -- 8: a checkpoint of another model id: clean error with a hint --------------------------------

def test_demo_wrong_model_checkpoint_gives_clean_error_with_hint(tmp_path, capsys):
    from configs.default import build_config
    from networks.models import build_vos_model
    cfg = build_config('pre_ytb_dav', 'x', 'aott')
    ckpt = tmp_path / 'someone_elses.pth'
    torch.save({'state_dict': build_vos_model(cfg.MODEL_VOS, cfg).state_dict()}, ckpt)
    video, mask = tmp_path / 'clip.mp4', tmp_path / 'm.png'
    make_video(video, 2)
    save_palette(truth_ids(), mask)
    rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', tmp_path / 'out',
                           '--model', 'deaott', '--ckpt_path', ckpt], capsys)
    assert rc == 1 and 'Traceback' not in err
    assert 'someone_elses.pth' in err and 'does not fit' in err
    assert 'fits model id aott' in err
    assert not (tmp_path / 'out' / 'pred_masks').exists()


# -- 10: frame sizes are checked when the source is opened; odd overlays are padded --------------

def test_mixed_sizes_and_corrupt_frames_fail_before_any_output(tmp_path, capsys):
    frames = frames_of(5)
    frames[3] = frames[3][:H - 2]
    folder = tmp_path / 'mixed'
    write_frames(folder, frames)
    with pytest.raises(FrameSourceError, match='00003.jpg.*one size'):
        open_frames(folder)
    mask = tmp_path / 'm.png'
    save_palette(truth_ids(), mask)
    rc, err, _ = run_demo(['--input', folder, '--mask', mask, '--output', tmp_path / 'o1'],
                          capsys)
    assert rc == 1 and '00003.jpg' in err
    assert not (tmp_path / 'o1').exists()

    corrupt = tmp_path / 'corrupt'
    write_frames(corrupt, frames_of(4))
    (corrupt / '00002.jpg').write_bytes(b'\xff\xd8 this is no jpeg')
    rc, err, _ = run_demo(['--input', corrupt, '--mask', mask, '--output', tmp_path / 'o2'],
                          capsys)
    assert rc == 1 and '00002.jpg' in err
    assert not (tmp_path / 'o2').exists()


def test_odd_sized_overlay_keeps_every_pixel(tmp_path, capsys):
    h, w = 77, 101
    folder = tmp_path / 'odd'
    write_frames(folder, [f[:h, :w] for f in frames_of(3)])
    mask = tmp_path / 'm.png'
    save_palette(truth_ids()[:h, :w], mask)
    out = tmp_path / 'out'
    rc, err, stdout = run_demo(['--input', folder, '--mask', mask, '--output', out], capsys)
    assert rc == 0, err
    cap = cv2.VideoCapture(str(out / 'odd_overlay.mp4'))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[:2] == (78, 102)      # padded, never cropped to 76x100
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['frame_size'] == [h, w] and summary['overlay_size'] == [78, 102]
    assert 'padded' in stdout
    assert read_png(out / 'pred_masks' / 'odd' / '00000.png')[2].shape == (h, w)


# -- 11: files written through a temporary file get the usual permissions ------------------------

def test_overlay_and_summary_get_the_umask_mode_like_the_pngs(tmp_path, capsys):
    video, mask, out = tmp_path / 'clip.mp4', tmp_path / 'm.png', tmp_path / 'out'
    make_video(video, 2)
    save_palette(truth_ids(), mask)
    old = os.umask(0o027)
    try:
        rc, err, _ = run_demo(['--input', video, '--mask', mask, '--output', out], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    modes = {p: stat.S_IMODE(os.stat(out / p).st_mode)
             for p in ('clip_overlay.mp4', 'summary.json', 'pred_masks/clip/00000.png')}
    assert set(modes.values()) == {0o640}, modes


# -- 12: CI turns a missing ../shared into a failure ---------------------------------------------

def test_require_shared_turns_the_skip_into_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, 'SHARED', tmp_path / 'no_shared_here')
    monkeypatch.delenv(conftest.REQUIRE_SHARED_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.shared_path('golden')
    monkeypatch.setenv(conftest.REQUIRE_SHARED_ENV, '1')
    with pytest.raises(pytest.fail.Exception, match='AOT_REQUIRE_SHARED'):
        conftest.shared_path('golden')
    ci = (conftest.REPO / '.ci' / 'run').read_text()
    assert 'export AOT_REQUIRE_SHARED=1' in ci
    assert ci.index('AOT_REQUIRE_SHARED=1') < ci.index('pytest')


# -- 9: the training set is checked up front, before any result folder exists -------------------

def _davis_train(root, n_frames=3):
    davis = root / 'DAVIS'
    (davis / 'ImageSets' / '2017').mkdir(parents=True)
    (davis / 'ImageSets' / '2017' / 'train.txt').write_text('clip\n')
    write_frames(davis / 'JPEGImages' / '480p' / 'clip', frames_of(n_frames))
    (davis / 'Annotations' / '480p' / 'clip').mkdir(parents=True)
    for i in range(n_frames):
        save_palette(truth_ids(), davis / 'Annotations' / '480p' / 'clip' / f'{i:05d}.png')
    return davis


def test_training_data_is_validated_before_any_folder_is_made(tmp_path, monkeypatch, capsys):
    from tools.train import main
    davis = _davis_train(tmp_path / 'vos')
    mask = davis / 'Annotations' / '480p' / 'clip' / '00002.png'
    mask.write_bytes(mask.read_bytes()[:60])          # truncated: the header still reads
    monkeypatch.setenv('AOT_RESULT_ROOT', str(tmp_path / 'runs'))
    argv = ['--stage', 'pre_ytb_dav', '--model', 'deaott', '--device', 'cpu', '--datasets',
            'davis2017', '--batch_size', '1', '--total_step', '1', '--no_pretrain',
            '--no_progress', '--workers', '0']
    with pytest.raises(SystemExit) as info:
        main(argv + ['--data_path', str(tmp_path / 'vos')])
    assert '00002.png' in str(info.value) and 'truncated' in str(info.value)
    assert not (tmp_path / 'runs').exists(), 'a result folder was made for a bad dataset'

    with pytest.raises(SystemExit) as info:
        main(argv + ['--data_path', str(tmp_path / 'nowhere')])
    assert str(tmp_path / 'nowhere') in str(info.value)
    assert not (tmp_path / 'runs').exists()

    from dataloaders.train_datasets import DAVIS2017_Train, validate_train_files
    save_palette(truth_ids(), mask)
    assert validate_train_files(DAVIS2017_Train(root=str(davis)), progress=False) == 6
