"""Distillation reads no label beyond each clip's reference mask, checked at the dataset level.

A small DAVIS-layout video set is written to disk; the kd_stage2 config builds the training set
from it. Then every mask file except each video's first is poisoned (random ids, then garbage
bytes that cannot be decoded, then deleted): the sampled clips stay bit-identical, and so does
the KD loss of a tiny distiller on them. The supervised pipeline, by contrast, reads those
files (it breaks on them), which shows the poisoning reaches what a leak would read.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from configs.default import build_config
from dataloaders.train_datasets import VOID_ID, build_train_dataset
from kd import clip_from_batch
from tests.test_kd_distiller import make_distiller

FRAMES, SIZE = 12, (72, 96)


def _write_videos(root, n_videos=3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE[0], 0:SIZE[1]].astype(np.float32)
    names = []
    for v in range(n_videos):
        name = f'video{v}'
        names.append(name)
        img_dir = os.path.join(root, 'JPEGImages', '480p', name)
        lab_dir = os.path.join(root, 'Annotations', '480p', name)
        os.makedirs(img_dir)
        os.makedirs(lab_dir)
        bg = rng.uniform(0, 255, (1, 1, 3)) * 0.5 + 40 * np.sin(xx / 7 + v)[..., None]
        c, vel = rng.uniform(25, 45, 2), rng.uniform(-2, 2, 2)
        for t in range(FRAMES):
            cy, cx = c + vel * t
            inside = ((yy - cy) / 14) ** 2 + ((xx - cx) / 18) ** 2 <= 1
            img = np.broadcast_to(bg, SIZE + (3,)).copy()
            img[inside] = (220, 60 + 10 * v, 30)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                os.path.join(img_dir, f'{t:05d}.jpg'), quality=95)
            Image.fromarray((inside * 255).astype(np.uint8)).save(
                os.path.join(lab_dir, f'{t:05d}.png'))
    split = os.path.join(root, 'ImageSets', '480p')
    os.makedirs(split)
    with open(os.path.join(split, 'train.txt'), 'w') as f:
        f.writelines(f'/JPEGImages/480p/{n}/00000.jpg /Annotations/480p/{n}/00000.png\n'
                     for n in names)
    return names


def _later_masks(root):
    lab_root = os.path.join(root, 'Annotations', '480p')
    for name in sorted(os.listdir(lab_root)):
        files = sorted(os.listdir(os.path.join(lab_root, name)))
        for f in files[1:]:
            yield os.path.join(lab_root, name, f)


def _poison(root, how, seed=1):
    rng = np.random.default_rng(seed)
    for path in _later_masks(root):
        if how == 'ids':
            Image.fromarray(rng.integers(0, 255, SIZE, dtype=np.uint8)).save(path)
        elif how == 'garbage':
            with open(path, 'wb') as f:
                f.write(b'not a png' + rng.bytes(64))
        else:
            os.remove(path)


def _cfg(stage, root, model='deaott_gda'):
    cfg = build_config(stage, 'poison', model)
    cfg.init_dir(data=str(root))
    cfg.DATASETS = ['davis2016']
    cfg.DATA_RANDOMCROP = (65, 65)
    cfg.DATA_SHORT_EDGE_LEN = 72
    cfg.DATA_SEQ_LEN = 4
    cfg.DATA_DAVIS_REPEAT = 4
    return cfg


def _clips(cfg, n=8):
    ds = build_train_dataset(cfg, seed=3)
    ds.set_epoch(1)
    return [ds[i] for i in range(min(n, len(ds)))]


def _assert_same(a, b):
    for key in ('ref_img', 'prev_img', 'ref_label', 'prev_label'):
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(a['curr_img'] + a['curr_label'], b['curr_img'] + b['curr_label']):
        assert torch.equal(x, y)
    assert a['meta'] == b['meta']


@pytest.fixture()
def videos(tmp_path):
    root = tmp_path / 'DAVIS'
    _write_videos(str(root))
    return tmp_path


def test_kd_config_is_label_free():
    for stage in ('kd_stage1', 'kd_stage2'):
        assert build_config(stage, 'x', 'deaott_gda').DATA_LABEL_FREE is True
    for stage in ('pre', 'pre_dav', 'pre_ytb_dav'):
        assert build_config(stage, 'x', 'deaott').DATA_LABEL_FREE is False


@pytest.mark.parametrize('how', ['ids', 'garbage', 'deleted'])
def test_poisoned_later_masks_change_no_kd_clip_and_no_kd_loss(videos, how):
    cfg = _cfg('kd_stage2', videos)
    clean = _clips(cfg)
    # The clips hold the reference mask and nothing else.
    for clip in clean:
        assert int(clip['ref_label'].max()) <= 1 and clip['meta']['obj_num'] <= 1
        for lab in [clip['prev_label']] + clip['curr_label']:
            assert set(torch.unique(lab).tolist()) <= {0, VOID_ID}
    distiller = make_distiller('deaott_gda', 'deaott', KD_TEACHER_LAYER=1)

    def kd_loss(clips):
        batch = default_collate(clips[:2])
        torch.manual_seed(0)
        loss, logs = distiller.step_clip(*clip_from_batch(batch))
        return loss.detach(), {k: v.detach() for k, v in logs.items()}

    clean_loss, clean_logs = kd_loss(clean)

    _poison(str(videos / 'DAVIS'), how)
    poisoned = _clips(cfg)
    assert len(poisoned) == len(clean)
    for a, b in zip(clean, poisoned):
        _assert_same(a, b)
    loss, logs = kd_loss(poisoned)
    assert torch.equal(loss, clean_loss)
    for key, value in clean_logs.items():
        assert torch.equal(logs[key], value), key


def test_supervised_clips_do_read_later_masks(videos):
    """The control: the same poisoning changes (or breaks) supervised clips."""
    cfg = _cfg('pre_dav', videos, 'deaott')
    clean = _clips(cfg)
    _poison(str(videos / 'DAVIS'), 'ids')
    poisoned = _clips(cfg)
    changed = False
    for a, b in zip(clean, poisoned):
        changed |= not all(torch.equal(x, y) for x, y in zip(
            [a['prev_label']] + a['curr_label'], [b['prev_label']] + b['curr_label']))
    assert changed


def test_label_free_clips_start_at_the_first_frame(videos):
    cfg = _cfg('kd_stage2', videos)
    ds = build_train_dataset(cfg, seed=0).datasets[0]
    assert ds.label_free
    rng_frames = set()
    for i in range(16):
        rng = ds.item_rng(i)
        clip = ds.sample_label_free(i, rng)
        assert clip['meta']['frame_num'] == FRAMES
        rng_frames.add(float(clip['prev_img'].sum()))
    # The followers vary from clip to clip (random start, steps and direction).
    assert len(rng_frames) > 8
