"""Training data: synthetic static clips, DAVIS / YouTube-VOS clips, augmentations, merging,
seeding, and bad-data errors.

Most tests run on tiny datasets written to ``tmp_path`` whose images paint every object
in a colour that encodes its id, so "image and label stay aligned" is checked directly:
after any augmentation, the pixels under each label (away from edges) must carry one
object colour, the same one in every frame of the clip.
"""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders import image_transforms as IT
from dataloaders import video_transforms as VT
from dataloaders.train_datasets import (DAVIS2017_Train, StaticTrain, YOUTUBEVOS_Train,
                                        _merge_sample, build_train_dataset, read_mask,
                                        worker_init_fn)
from tests.conftest import shared_path

# id -> colour; 0 is background. The affine fill colour is a class of its own so that
# warped-in border pixels are never mistaken for an object.
PALETTE = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                    (255, 0, 255), (0, 255, 255), (255, 255, 255), (128, 0, 0),
                    (0, 128, 0), (0, 0, 128)], np.float64)
FILL_CLASS = len(PALETTE)
CLASSES = np.concatenate([PALETTE, np.array([IT.IMAGE_FILL], np.float64)])
MEAN = np.array(VT.IMAGENET_MEAN)
STD = np.array(VT.IMAGENET_STD)
H, W = 120, 160
CROP = 97


# ----------------------------------------------------------------------------------------
# tiny datasets


def _scene(boxes, h=H, w=W):
    """Label map and matching colour image; ``boxes`` = [(id, top, left, bh, bw)]."""
    label = np.zeros((h, w), np.uint8)
    for obj, top, left, bh, bw in boxes:
        label[max(top, 0):top + bh, max(left, 0):left + bw] = obj
    return label, PALETTE[label].astype(np.uint8)


def _save_image(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith('.png'):
        Image.fromarray(rgb).save(path)
    else:
        Image.fromarray(rgb).save(path, quality=95)


def _save_mask(path, label, palette=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if palette:
        m = Image.fromarray(label, 'P')
        m.putpalette(PALETTE.astype(np.uint8).ravel().tolist() + [0] * (768 - PALETTE.size))
    else:
        m = Image.fromarray(label, 'L')
    m.save(path)


def _video_boxes(t, n_obj=3):
    boxes = [(1, 10 + 2 * t, 8 + 3 * t, 40, 50), (2, 60 - t, 90 - 2 * t, 45, 40),
             (3, 70, 20 + t, 30, 35)]
    return boxes[:n_obj]


def make_davis(root, videos=('a', 'b', 'c'), n_frames=8, year=2017):
    """DAVIS-2017-style tree (or DAVIS-2016 with 0/255 masks and path-pair split lines)."""
    lines = []
    for v in videos:
        for t in range(n_frames):
            if year == 2016:
                label, rgb = _scene([(1,) + _video_boxes(t)[0][1:]])
            else:
                label, rgb = _scene(_video_boxes(t))
            _save_image(os.path.join(root, 'JPEGImages', '480p', v, f'{t:05d}.jpg'), rgb)
            mask_path = os.path.join(root, 'Annotations', '480p', v, f'{t:05d}.png')
            if year == 2016:
                _save_mask(mask_path, label * 255, palette=False)
                lines.append(f'/JPEGImages/480p/{v}/{t:05d}.jpg /Annotations/480p/{v}/{t:05d}.png')
            else:
                _save_mask(mask_path, label)
    split_dir = os.path.join(root, 'ImageSets', '480p' if year == 2016 else '2017')
    os.makedirs(split_dir, exist_ok=True)
    with open(os.path.join(split_dir, 'train.txt'), 'w') as f:
        f.write('\n'.join(lines if year == 2016 else videos) + '\n')
    return str(root)


def make_ytb(root, year=2019):
    base = os.path.join(root, str(year), 'train')
    videos = {}
    for v, n_obj in (('v1', 3), ('v2', 2)):
        stems = [f'{5 * t:05d}' for t in range(6)]
        for t, stem in enumerate(stems):
            label, rgb = _scene(_video_boxes(t, n_obj))
            _save_image(os.path.join(base, 'JPEGImages', v, stem + '.jpg'), rgb)
            _save_mask(os.path.join(base, 'Annotations', v, stem + '.png'), label)
        videos[v] = {'objects': {str(i): {'category': 'x', 'frames': stems}
                                 for i in range(1, n_obj + 1)}}
    # A video whose only object appears once is skipped, as upstream.
    _save_image(os.path.join(base, 'JPEGImages', 'short', '00000.jpg'), _scene([])[1])
    _save_mask(os.path.join(base, 'Annotations', 'short', '00000.png'), _scene([])[0])
    videos['short'] = {'objects': {'1': {'category': 'x', 'frames': ['00000']}}}
    with open(os.path.join(base, 'meta.json'), 'w') as f:
        json.dump({'videos': videos}, f)
    return str(root)


STATIC_SCENES = {
    # Pairing by sorted position would go wrong here: images sort as b.jpg < b.mirror.*,
    # masks as b.mirror.png < b.png (and upstream listed all jpgs before all pngs).
    'b.mirror.png': [(1, 10, 10, 50, 60), (2, 70, 90, 40, 60)],
    'b.jpg': [(3, 20, 80, 80, 70), (4, 5, 5, 40, 40), (5, 60, 10, 50, 50)],
    'c.jpg': [(6, 30, 30, 60, 100)],
}


def make_static_tree(root):
    for name, boxes in STATIC_SCENES.items():
        label, rgb = _scene(boxes)
        _save_image(os.path.join(root, 'JPEGImages', 'DS', name), rgb)
        _save_mask(os.path.join(root, 'Annotations', 'DS', os.path.splitext(name)[0] + '.png'),
                   label)
    return str(root)


def make_static_flat(root):
    for k, (name, boxes) in enumerate(STATIC_SCENES.items()):
        label, rgb = _scene(boxes)
        sub = os.path.join(root, 'nested' if k == 2 else '')
        stem = os.path.splitext(name)[0]
        _save_image(os.path.join(sub, stem + '.jpg'), rgb)
        _save_mask(os.path.join(sub, stem + '.png'), label, palette=False)
    return str(root)


def v1_transforms(crop=CROP, short_edge=H):
    return VT.build_train_transforms('v1', crop_size=(crop, crop), short_edge=short_edge)


def v2_transforms(crop=CROP, short_edge=H):
    return VT.build_train_transforms('v2', crop_size=(crop, crop), short_edge=short_edge)


# ----------------------------------------------------------------------------------------
# checks


def _frames(sample):
    return ([sample['ref_img'], sample['prev_img']] + list(sample['curr_img']),
            [sample['ref_label'], sample['prev_label']] + list(sample['curr_label']))


def check_format(sample, size, n_curr=3, max_obj_n=10):
    images, labels = _frames(sample)
    assert len(sample['curr_img']) == len(sample['curr_label']) == n_curr
    obj_num = sample['meta']['obj_num']
    assert isinstance(obj_num, int) and 0 <= obj_num <= max_obj_n
    assert set(sample['meta']) >= {'seq_name', 'frame_num', 'obj_num'}
    present = set()
    for img, lab in zip(images, labels):
        assert img.shape == (3, size, size) and img.dtype == torch.float32
        assert lab.shape == (1, size, size) and lab.dtype == torch.int64
        assert torch.isfinite(img).all()
        present |= set(torch.unique(lab).tolist())
    assert present <= set(range(obj_num + 1))
    # The reference frame holds every object it numbers (ids are contiguous 1..obj_num).
    assert set(torch.unique(sample['ref_label']).tolist()) == set(range(obj_num + 1))


def colour_classes(img):
    rgb = (img.numpy().transpose(1, 2, 0).astype(np.float64) * STD + MEAN) * 255
    d = ((rgb[:, :, None, :] - CLASSES[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def check_aligned(sample, reverse=False, margin=3, purity=0.97):
    """Every label's interior pixels show one object colour, the same in every frame.

    With ``reverse``, the interior of each such colour region must also carry that label
    (only valid when no object of the same colour can have been dropped).
    """
    images, labels = _frames(sample)
    colour_of = {}
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    checked = 0
    for img, lab in zip(images, labels):
        cls = colour_classes(img)
        lab = lab[0].numpy()
        for j in np.unique(lab):
            if j == 0:
                continue
            inner = cv2.erode((lab == j).astype(np.uint8), kernel).astype(bool)
            if inner.sum() < 20:
                continue
            values, counts = np.unique(cls[inner], return_counts=True)
            top = values[counts.argmax()]
            assert counts.max() / inner.sum() >= purity, (j, values, counts)
            assert top not in (0, FILL_CLASS), f'label {j} sits on background pixels'
            assert colour_of.setdefault(j, top) == top, 'label changed colour between frames'
            checked += 1
            if reverse:
                region = cv2.erode((cls == top).astype(np.uint8), kernel).astype(bool)
                assert (lab[region] == j).mean() >= purity
    return checked


# ----------------------------------------------------------------------------------------
# image_transforms


def test_inverse_affine_matrix_matches_composed_forward_map():
    rng = np.random.default_rng(0)
    for _ in range(20):
        angle, sx = rng.uniform(-30, 30), rng.uniform(-15, 15)
        scale, tx, ty = rng.uniform(0.8, 1.2), rng.uniform(-9, 9), rng.uniform(-9, 9)
        cx, cy = rng.uniform(10, 50, size=2)
        a, s = math.radians(angle), math.radians(sx)
        T = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
        C = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
        R = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        S = np.diag([scale, scale, 1.0])
        Sh = np.array([[1, -math.tan(s), 0], [0, 1, 0], [0, 0, 1]])
        forward = T @ C @ R @ S @ Sh @ np.linalg.inv(C)
        expected = np.linalg.inv(forward)[:2].ravel()
        got = IT.inverse_affine_matrix((cx, cy), angle, (tx, ty), scale, (sx, 0.0))
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_image_transforms_keep_image_and_mask_together():
    label, rgb = _scene(STATIC_SCENES['b.jpg'])
    img, mask = Image.fromarray(rgb), Image.fromarray(label, 'L')
    rng = np.random.default_rng(1)
    affine = IT.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10)
    crop = IT.RandomResizedCrop.for_output((CROP, CROP))
    for _ in range(6):
        a_img, a_mask = IT.RandomHorizontalFlip(0.5)(img, mask, rng)
        a_img, a_mask = affine(a_img, a_mask, rng)
        a_img, a_mask = crop(a_img, a_mask, rng)
        assert a_img.size == a_mask.size == (CROP, CROP)
        sample = {'ref_img': VT.image_to_tensor(np.asarray(a_img, np.float32)),
                  'ref_label': VT.label_to_tensor(np.asarray(a_mask)),
                  'prev_img': VT.image_to_tensor(rgb.astype(np.float32)),
                  'prev_label': VT.label_to_tensor(label), 'curr_img': [], 'curr_label': []}
        assert check_aligned(sample, reverse=True) >= 3
    # The affine fill: a pure translation brings in fill colour on the image, 0 on the mask.
    t_img = img.transform(img.size, Image.AFFINE,
                          IT.inverse_affine_matrix((80, 60), 0, (30, 0), 1.0, (0, 0)),
                          Image.BICUBIC, fillcolor=IT.IMAGE_FILL)
    assert tuple(np.asarray(t_img)[60, 5]) == IT.IMAGE_FILL


def test_random_resized_crop_params_follow_upstream_rule():
    crop = IT.RandomResizedCrop.for_output((100, 200), scale=(0.8, 1.0))
    assert crop.ratio == pytest.approx((1.5, 2 * 4 / 3))
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop.get_params(rng, 400, 300)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.8 * 400 * 300 * 0.97 <= h * w <= 400 * 300
        assert 1.5 * 0.97 <= w / h <= 2 * 4 / 3 * 1.03
    # No draw can fit in a tall image: the fallback is the widest centred crop in range.
    top, left, h, w = crop.get_params(rng, 40, 300)
    assert (w, h) == (40, round(40 / 1.5)) and top == (300 - h) // 2 and left == 0


def test_photometric_transforms():
    rng = np.random.default_rng(0)
    red = Image.new('RGB', (8, 8), (255, 0, 0))
    assert np.abs(np.asarray(IT.adjust_hue(red, 1 / 3))[0, 0].astype(int)
                  - (0, 255, 0)).max() <= 6
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), np.uint8))
    gray = np.asarray(IT.RandomGrayscale(1.0)(img, rng))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.array_equal(np.asarray(IT.ColorJitter()(img, rng)), np.asarray(img))
    assert np.array_equal(np.asarray(IT.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.0)(img, rng)),
                          np.asarray(img))
    blurred = np.asarray(IT.GaussianBlur((1.5, 2.0))(img, rng)).astype(float)
    assert blurred.std() < np.asarray(img).astype(float).std()


# ----------------------------------------------------------------------------------------
# video_transforms


def _raw_clip(labels, h=H, w=W):
    images = [PALETTE[lab % len(PALETTE)].astype(np.float32) for lab in labels]
    return {'ref_img': images[0], 'prev_img': images[1], 'curr_img': images[2:],
            'ref_label': labels[0], 'prev_label': labels[1], 'curr_label': labels[2:],
            'meta': {'seq_name': 'x', 'frame_num': len(labels), 'obj_num': 0}}


def test_balanced_crop_relabels_by_reference_objects():
    ref = np.zeros((H, W), np.uint8)
    ref[:40, :40] = 7
    ref[50:90, 50:120] = 3
    ref[100:105, 0:10] = 9            # 50 px: too small to keep
    later = ref.copy()
    later[0:20, 100:140] = 5          # not in the reference: becomes background
    sample = _raw_clip([ref, later, later.copy(), later.copy(), later.copy()])
    out = VT.BalancedRandomCrop((H, W))(sample, np.random.default_rng(0))
    assert out['meta']['obj_num'] == 2
    expected = np.select([ref == 3, ref == 7], [1, 2], 0)
    np.testing.assert_array_equal(out['ref_label'], expected)
    for lab in [out['prev_label']] + out['curr_label']:
        np.testing.assert_array_equal(lab, expected)

    many = np.zeros((H, W), np.uint8)
    for k in range(12):                # 12 objects of 200 px, max 10 kept
        many[(k // 6) * 20:(k // 6) * 20 + 10, (k % 6) * 25:(k % 6) * 25 + 20] = k + 1
    out = VT.BalancedRandomCrop((H, W), max_obj_num=10)(_raw_clip([many] * 5),
                                                        np.random.default_rng(3))
    assert out['meta']['obj_num'] == 10
    mapping = {}
    for old, new in zip(many.ravel(), out['ref_label'].ravel()):
        assert mapping.setdefault(int(old), int(new)) == int(new)
    kept = {o for o, n in mapping.items() if n and o}
    assert len(kept) == 10 and sorted(mapping[o] for o in kept) == list(range(1, 11))


def test_resize_pads_randomly_and_to_tensor_normalises():
    lab = np.zeros((50, 60), np.uint8)
    lab[10:20, 10:20] = 1
    sample = _raw_clip([lab] * 5)
    out = VT.Resize((64, 64), use_padding=True)(sample, np.random.default_rng(2))
    img, padded = out['ref_img'], out['ref_label']
    assert img.shape == (64, 64, 3) and padded.shape == (64, 64)
    ys, xs = np.nonzero(padded)
    top, left = ys.min() - 10, xs.min() - 10
    assert 0 <= top <= 14 and 0 <= left <= 4 and padded.sum() == 100
    inside = np.zeros((64, 64), bool)
    inside[top:top + 50, left:left + 60] = True
    assert (img[~inside] == np.array(IT.IMAGE_FILL, np.float32)).all()
    assert (padded[~inside] == 0).all()
    tensors = VT.ToTensor()(out)
    ref = (img.astype(np.float64) / 255 - MEAN) / STD
    np.testing.assert_allclose(tensors['ref_img'].numpy(), ref.transpose(2, 0, 1), atol=1e-6)
    assert tensors['ref_label'].shape == (1, 64, 64) and tensors['ref_label'].dtype == torch.int64


def test_random_scale_keeps_labels_on_their_pixels():
    label, rgb = _scene(_video_boxes(0))
    for seed in range(3):
        sample = _raw_clip([label.copy() for _ in range(5)])
        out = VT.RandomScale(0.7, 1.3, short_edge=240)(sample, np.random.default_rng(seed))
        h, w = out['ref_label'].shape
        assert out['ref_img'].shape[:2] == (h, w) and 1.4 * H - 1 <= h <= 2.6 * H + 1
        assert w == round(W * h / H) or abs(w - W * h / H) <= 1
        assert check_aligned(VT.ToTensor()(out), reverse=True) >= 5


# ----------------------------------------------------------------------------------------
# StaticTrain


@pytest.mark.parametrize('layout', ['tree', 'flat'])
def test_static_clips_are_aligned_and_well_formed(tmp_path, layout):
    root = make_static_tree(tmp_path) if layout == 'tree' else make_static_flat(tmp_path)
    ds = StaticTrain(root, output_size=CROP, dynamic_merge=False, aug_type='v1')
    assert len(ds) == 3
    for stem_a, stem_b in ds.pairs:
        assert os.path.splitext(os.path.basename(stem_a))[0] == \
            os.path.splitext(os.path.basename(stem_b))[0]
    checked = 0
    for idx in range(len(ds)):
        for epoch in range(2):
            ds.set_epoch(epoch)
            sample = ds[idx]
            check_format(sample, CROP)
            assert sample['meta']['obj_num'] >= 1
            checked += check_aligned(sample, reverse=True)
    assert checked > 30


def test_static_merge_and_v2(tmp_path):
    ds = StaticTrain(make_static_tree(tmp_path), output_size=CROP, merge_prob=1.0,
                     aug_type='v1')
    for idx in range(len(ds)):
        sample = ds[idx]
        check_format(sample, CROP)
        check_aligned(sample)
    ds2 = StaticTrain(str(tmp_path), output_size=(CROP, CROP + 16), aug_type='v2', seq_len=4)
    sample = ds2[0]
    assert len(sample['curr_img']) == 2 and sample['ref_img'].shape == (3, CROP, CROP + 16)


def test_static_reads_0_255_masks_as_object_1(tmp_path):
    label, rgb = _scene([(1, 10, 10, 60, 80)])
    _save_image(str(tmp_path / 'x.jpg'), rgb)
    _save_mask(str(tmp_path / 'x.png'), label * 255, palette=False)
    sample = StaticTrain(str(tmp_path), output_size=CROP, dynamic_merge=False)[0]
    assert sample['meta']['obj_num'] == 1
    assert set(torch.unique(sample['ref_label']).tolist()) == {0, 1}
    check_aligned(sample, reverse=True)


def _coco_like(tmp_path, n_images=2, n_objects=9):
    """``images/`` + ``masks/`` (the coco128-static layout) with many objects and a crowd
    (255) region in every mask."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'coco'
    for i in range(n_images):
        boxes = [(k + 1, int(rng.integers(0, H - 20)), int(rng.integers(0, W - 20)), 18, 18)
                 for k in range(n_objects)]
        label, rgb = _scene(boxes)
        label = label.copy()
        label[:20, -30:] = 255
        _save_image(str(root / 'images' / f'{i:04d}.jpg'), rgb)
        _save_mask(str(root / 'masks' / f'{i:04d}.png'), label)
    return str(root)


@pytest.mark.parametrize('merge', [False, True])
def test_static_coco_layout_keeps_crowd_void_and_caps_objects(tmp_path, merge):
    root = _coco_like(tmp_path)
    ds = StaticTrain(root, output_size=CROP, max_obj_n=5, dynamic_merge=merge,
                     merge_prob=1.0, aug_type='v1')
    assert [os.path.basename(p) for pair in ds.pairs for p in pair] == \
        ['0000.jpg', '0000.png', '0001.jpg', '0001.png']
    seen_void = False
    for epoch in range(3):
        ds.set_epoch(epoch)
        for idx in range(len(ds)):
            sample = ds[idx]
            n = sample['meta']['obj_num']
            assert 1 <= n <= 5
            for lab in [sample['ref_label'], sample['prev_label']] + sample['curr_label']:
                ids = set(torch.unique(lab).tolist())
                # ids are 0..n plus void; 255 is never counted as an object
                assert ids <= set(range(n + 1)) | {255}
                seen_void |= 255 in ids
    assert seen_void


def test_static_shrinks_large_images_before_warping(tmp_path):
    label, rgb = _scene([(1, 10, 10, 60, 80)], h=480, w=640)
    _save_image(str(tmp_path / 'big.jpg'), rgb)
    _save_mask(str(tmp_path / 'big.png'), label)
    ds = StaticTrain(str(tmp_path), output_size=CROP, dynamic_merge=False)
    img, mask = ds.load_pair(0)
    assert min(img.size) == round(StaticTrain.PRESHRINK_MARGIN * CROP) and img.size == mask.size
    assert set(np.unique(np.asarray(mask)).tolist()) == {0, 1}


def test_real_coco128_static():
    root = shared_path('data', 'coco128-static')
    ds = StaticTrain(str(root), output_size=129, max_obj_n=10, merge_prob=1.0)
    assert len(ds) == 128
    for idx in (0, 5, 77):
        sample = ds[idx]
        assert 0 <= sample['meta']['obj_num'] <= 10
        top = int(torch.where(sample['ref_label'] == 255, 0, sample['ref_label']).max())
        assert top <= sample['meta']['obj_num']


# ----------------------------------------------------------------------------------------
# VOS datasets


def test_davis2017_clips(tmp_path):
    root = make_davis(tmp_path)
    ds = DAVIS2017_Train(root=root, transform=v1_transforms(), repeat_time=2, rand_gap=3,
                         merge_prob=0.0)
    assert len(ds) == 6 and ds.seqs == ['a', 'b', 'c']
    for idx in range(len(ds)):
        sample = ds[idx]
        check_format(sample, CROP)
        assert sample['meta']['frame_num'] == 8 and sample['meta']['seq_name'] in 'abc'
        check_aligned(sample, reverse=True)
    merged = DAVIS2017_Train(root=root, transform=v1_transforms(), merge_prob=1.0)
    for idx in range(3):
        sample = merged[idx]
        check_format(sample, CROP)
        check_aligned(sample)
    v2 = DAVIS2017_Train(root=root, transform=v2_transforms(), seq_len=6)
    check_format(v2[0], CROP, n_curr=4)
    prev_mode = DAVIS2017_Train(root=root, transform=v1_transforms(), enable_prev_frame=True,
                                merge_prob=0.0)
    sample = prev_mode[1]
    check_format(sample, CROP, n_curr=4)
    check_aligned(sample)


def test_davis2016_masks_hold_object_1(tmp_path):
    root = make_davis(tmp_path, videos=('p', 'q'), year=2016)
    ds = DAVIS2017_Train(root=root, year=2016, transform=v1_transforms(), merge_prob=0.0)
    assert ds.seqs == ['p', 'q']
    for idx in range(4):
        sample = ds[idx]
        check_format(sample, CROP)
        assert sample['meta']['obj_num'] == 1
        check_aligned(sample, reverse=True)
    # Read as 0/255 without year=2016, 255 would be an id of its own.
    path = os.path.join(root, 'Annotations', '480p', 'p', '00000.png')
    assert set(np.unique(read_mask(path, 'binary'))) == {0, 1}
    assert set(np.unique(read_mask(path, 'index'))) == {0, 255}


def test_youtubevos_clips(tmp_path):
    ds = YOUTUBEVOS_Train(make_ytb(tmp_path), transform=v1_transforms(), merge_prob=0.5)
    assert ds.seqs == ['v1', 'v2'] and len(ds.imglistdic['v1'][0]) == 6
    for idx in range(4):
        sample = ds[idx]
        check_format(sample, CROP)
        check_aligned(sample)


def test_merge_matches_one_hot_reference():
    rng = np.random.default_rng(0)
    size = 40

    def clip(n_obj, small_id=None):
        labels = []
        for t in range(5):
            lab = np.zeros((size, size), np.int64)
            for k in range(1, n_obj + 1):
                y, x = rng.integers(0, size - 12, 2)
                lab[y:y + 12, x:x + 12] = k     # 144 px unless overlapped
            if small_id is not None:
                lab[lab == small_id] = 0
                lab[0:5, 0:5] = small_id        # 25 px: dropped
            labels.append(torch.from_numpy(lab)[None])
        images = [torch.from_numpy(rng.normal(size=(3, size, size)).astype(np.float32))
                  for _ in range(5)]
        return {'ref_img': images[0], 'prev_img': images[1], 'curr_img': images[2:],
                'ref_label': labels[0], 'prev_label': labels[1], 'curr_label': labels[2:],
                'meta': {'seq_name': 's', 'frame_num': 5, 'obj_num': n_obj}}

    s1, s2 = clip(3, small_id=2), clip(2)
    out = _merge_sample(s1, s2, min_obj_pixels=100, max_obj_n=10)
    # Reference: upstream's formulation, one-hot over 21 ids, channel selection by the
    # reference frame's pixel counts, background +0.1, argmax.
    ids = torch.arange(21).view(21, 1, 1)
    f1, f2 = _frames(s1), _frames(s2)
    selected = None
    for k, (o_img, o_lab) in enumerate(zip(*_frames(out))):
        fg = (f2[1][k] > 0).float()
        np.testing.assert_array_equal(o_img, f1[0][k] * (1 - fg) + f2[0][k] * fg)
        onehot = ((f1[1][k] * (1 - fg).long() + (f2[1][k] + 10) * fg.long()) == ids).float()
        if selected is None:
            selected = onehot.sum((1, 2)) > 100
            selected[0] = True
        picked = onehot[selected]
        picked[0] += 0.1
        np.testing.assert_array_equal(o_lab[0], picked.argmax(0))
    assert out['meta']['obj_num'] == int(selected.sum()) - 1
    assert out['meta']['seq_name'] == 's' and s1['meta']['obj_num'] == 3

    # More than max_obj_n survivors: a random max_obj_n, each id one source object.
    s1, s2 = clip(8), clip(7)
    out = _merge_sample(s1, s2, min_obj_pixels=10, max_obj_n=10, rng=np.random.default_rng(1))
    assert out['meta']['obj_num'] == 10
    mapping = {}
    for l1, l2, lo in zip(_frames(s1)[1], _frames(s2)[1], _frames(out)[1]):
        src = torch.where(l2 > 0, l2 + 10, l1)
        for a, b in zip(src.flatten().tolist(), lo.flatten().tolist()):
            assert mapping.setdefault(a, b) == b
    assert sorted(v for v in mapping.values() if v) == list(range(1, 11))


# ----------------------------------------------------------------------------------------
# seeding


def _equal(a, b):
    fa, fb = _frames(a), _frames(b)
    return a['meta'] == b['meta'] and all(
        torch.equal(x, y) for x, y in zip(fa[0] + fa[1], fb[0] + fb[1]))


def test_same_seed_same_samples(tmp_path):
    root = make_davis(tmp_path)
    make_ds = lambda seed: DAVIS2017_Train(root=root, transform=v2_transforms(),  # noqa: E731
                                           repeat_time=2, seed=seed)
    a, b, c = make_ds(0), make_ds(0), make_ds(1)
    assert _equal(a[1], b[1]) and _equal(a[1], a[1])
    assert not _equal(a[1], c[1])
    b.set_epoch(1)
    assert not _equal(a[1], b[1])
    s = StaticTrain(make_static_tree(tmp_path / 'static'), output_size=CROP, aug_type='v2')
    s_again = StaticTrain(str(tmp_path / 'static'), output_size=CROP, aug_type='v2')
    assert _equal(s[2], s_again[2]) and not _equal(s[2], s[1])


def test_samples_do_not_depend_on_worker_count(tmp_path):
    root = make_davis(tmp_path)
    ds = DAVIS2017_Train(root=root, transform=v2_transforms(crop=65, short_edge=80),
                         repeat_time=2)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers,
                                             worker_init_fn=worker_init_fn)
        batches[workers] = list(loader)
    for b0, b2 in zip(batches[0], batches[2]):
        for key in ('ref_img', 'ref_label', 'prev_img', 'prev_label'):
            assert torch.equal(b0[key], b2[key])
        for x, y in zip(b0['curr_img'] + b0['curr_label'], b2['curr_img'] + b2['curr_label']):
            assert torch.equal(x, y)
        assert torch.equal(b0['meta']['obj_num'], b2['meta']['obj_num'])
    # Fetch order does not matter either.
    assert _equal(ds[5], [ds[i] for i in (5, 4, 3)][0])


# ----------------------------------------------------------------------------------------
# config


def test_build_train_dataset_from_config(tmp_path):
    from configs.default import DefaultEngineConfig
    cfg = DefaultEngineConfig('test', 'deaott')
    cfg.DIR_STATIC = make_static_tree(tmp_path / 'static')
    cfg.DIR_DAVIS = make_davis(tmp_path / 'davis', videos=('a', 'b'))
    cfg.DIR_DAVIS2016 = make_davis(tmp_path / 'davis16', videos=('p',), year=2016)
    cfg.DIR_YTB = make_ytb(tmp_path / 'ytb')
    cfg.DATASETS = ['static', 'davis2017', 'davis2016', 'youtubevos']
    cfg.DATA_RANDOMCROP = (65, 65)
    cfg.DATA_SHORT_EDGE_LEN = 80
    cfg.TRAIN_ENABLE_PREV_FRAME = True
    ds = build_train_dataset(cfg, seed=3)
    assert [len(d) for d in ds.datasets] == [3, 2 * cfg.DATA_DAVIS_REPEAT, 1 * 5, 2]
    assert ds.enable_prev_frame is False          # static images in the mix
    assert ds.datasets[2].mask_mode == 'binary'
    for idx in (0, 4, 14, len(ds) - 1):
        check_format(ds[idx], 65)
    ds.set_epoch(4)
    assert all(d.epoch == 4 for d in ds.datasets)

    cfg.DATASETS = []
    with pytest.raises(ValueError, match='DATASETS'):
        build_train_dataset(cfg)
    cfg.DATASETS = ['coco']
    with pytest.raises(ValueError, match='coco'):
        build_train_dataset(cfg)


# ----------------------------------------------------------------------------------------
# bad data


def test_static_bad_data_names_the_file(tmp_path):
    root = make_static_tree(tmp_path / 't1')
    orphan = os.path.join(root, 'JPEGImages', 'DS', 'd.jpg')
    _save_image(orphan, _scene([])[1])
    with pytest.raises(ValueError, match='d.jpg: image has no mask'):
        StaticTrain(root)

    root = make_static_tree(tmp_path / 't2')
    extra = os.path.join(root, 'Annotations', 'DS', 'e.png')
    _save_mask(extra, _scene([])[0])
    with pytest.raises(ValueError, match='e.png: mask has no image'):
        StaticTrain(root)

    root = make_static_flat(tmp_path / 'f1')
    os.remove(os.path.join(root, 'nested', 'c.png'))
    with pytest.raises(ValueError, match=r'nested.c\.jpg: image has no mask'):
        StaticTrain(root)

    root = make_static_flat(tmp_path / 'f2')
    bad_mask = os.path.join(root, 'b.png')
    _save_mask(bad_mask, np.zeros((H - 1, W), np.uint8))
    ds = StaticTrain(root)
    with pytest.raises(ValueError, match=r'b\.png: mask is 160x119 .*b\.jpg is 160x120'):
        ds[[p[1] for p in ds.pairs].index(bad_mask)]

    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match='empty: no image'):
        StaticTrain(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='nowhere'):
        StaticTrain(str(tmp_path / 'nowhere'))
    os.makedirs(tmp_path / 'half' / 'JPEGImages')
    with pytest.raises(FileNotFoundError, match='Annotations'):
        StaticTrain(str(tmp_path / 'half'))

    colour = tmp_path / 'colour.png'
    Image.fromarray(np.dstack([_scene(_video_boxes(0))[0] * k for k in (1, 2, 3)])).save(colour)
    with pytest.raises(ValueError, match='colour.png: RGB colour mask'):
        read_mask(str(colour))


def test_vos_bad_data_names_the_file(tmp_path):
    root = make_davis(tmp_path / 'd1')
    os.remove(os.path.join(root, 'Annotations', '480p', 'b', '00003.png'))
    with pytest.raises(ValueError, match=r'b.00003\.jpg: image has no mask'):
        DAVIS2017_Train(root=root)

    root = make_davis(tmp_path / 'd2')
    bad = os.path.join(root, 'Annotations', '480p', 'a', '00002.png')
    _save_mask(bad, np.zeros((H, W + 2), np.uint8))
    ds = DAVIS2017_Train(root=root, seq_names=['a'], rand_gap=1, rand_reverse=False,
                         transform=v1_transforms())
    with pytest.raises(ValueError, match=r'00002\.png: mask is 162x120'):
        for idx in range(len(ds)):      # some clip of 'a' includes frame 2
            ds[idx]

    root = make_davis(tmp_path / 'd3')
    split = os.path.join(root, 'ImageSets', '2017', 'train.txt')
    open(split, 'w').close()
    with pytest.raises(ValueError, match=r'2017.train\.txt: split file lists no videos'):
        DAVIS2017_Train(root=root)
    with pytest.raises(FileNotFoundError, match=r'ImageSets.2017.val\.txt'):
        DAVIS2017_Train(root=root, split=['val'])
    with open(split, 'w') as f:
        f.write('a\nghost\n')
    with pytest.raises(FileNotFoundError, match=r'480p.ghost: video folder not found'):
        DAVIS2017_Train(root=root)

    root = make_ytb(tmp_path / 'y1')
    os.remove(os.path.join(root, '2019', 'train', 'Annotations', 'v2', '00010.png'))
    with pytest.raises(FileNotFoundError, match=r'v2.00010\.png: mask of .*00010\.jpg'):
        YOUTUBEVOS_Train(root)
    meta = os.path.join(root, '2019', 'train', 'meta.json')
    with open(meta, 'w') as f:
        json.dump({'videos': {}}, f)
    with pytest.raises(ValueError, match='meta.json: no video'):
        YOUTUBEVOS_Train(root)


# ----------------------------------------------------------------------------------------
# real data


def test_real_davis2016_train():
    root = str(shared_path('data', 'davis2016-train'))
    tf = VT.build_train_transforms('v2', crop_size=(129, 129), short_edge=160)
    ds = DAVIS2017_Train(root=root, year=2016, seq_names=['bear', 'boat', 'dog-agility'],
                         transform=tf, merge_prob=0.0)
    for idx in range(3):
        sample = ds[idx]
        check_format(sample, 129)
        assert sample['meta']['obj_num'] == 1
    # The official split file (path pairs) names the 30 training videos.
    full = DAVIS2017_Train(root=root, year=2016, transform=tf, repeat_time=1)
    assert len(full) == 30 and 'bear' in full.seqs
    # Its frames double as static image + mask pairs (0/255 masks -> object 1).
    static = StaticTrain(root, output_size=129, dynamic_merge=False, aug_type='v2')
    assert len(static) == 2079
    sample = static[0]
    check_format(sample, 129)
    assert sample['meta']['obj_num'] == 1
