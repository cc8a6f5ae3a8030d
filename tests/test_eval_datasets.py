"""Evaluation readers on tiny generated DAVIS / YouTube-VOS / custom folders, and their errors."""
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from dataloaders.eval_datasets import (CustomTest, DatasetFormatError, DAVIS_Test, VOSTest,
                                       YOUTUBEVOS_DenseTest, YOUTUBEVOS_Test)
from dataloaders.eval_transforms import Compose, MultiRestrictSize, MultiToTensor
from tests.conftest import shared_path
from utils.image import MaskFormatError

H, W = 24, 40


def write_frame(path, seed, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path, quality=95)


def write_palette(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode='L').convert('P')
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def boxes(*objs, size=(H, W)):
    """Id map with ``(id, y0, y1, x0, x1)`` boxes."""
    m = np.zeros(size, np.uint8)
    for obj, y0, y1, x0, x1 in objs:
        m[y0:y1, x0:x1] = obj
    return m


def expected_rgb(path):
    return cv2.imread(str(path))[:, :, ::-1].astype(np.float32)


def listing(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


# ------------------------------------------------------------------------------------ DAVIS

@pytest.fixture
def davis(tmp_path):
    root = tmp_path / 'DAVIS'
    m0 = boxes((1, 2, 10, 2, 12), (2, 12, 20, 20, 36))
    for seq, n in (('bike', 4), ('cows', 3)):
        for t in range(n):
            write_frame(root / 'JPEGImages' / '480p' / seq / f'{t:05d}.jpg', t)
        write_palette(root / 'Annotations' / '480p' / seq / '00000.png', m0)
        write_palette(root / 'Annotations' / '480p' / seq / '00001.png', m0)  # never used
    (root / 'ImageSets' / '2017').mkdir(parents=True)
    (root / 'ImageSets' / '2017' / 'val.txt').write_text('cows\nbike\ncows\n')
    (root / 'ImageSets' / '2017' / 'test-dev.txt').write_text('bike\n')
    return root, m0


def test_davis2017(davis):
    root, m0 = davis
    before = listing(root.parent)
    ds = DAVIS_Test('val', str(root), 2017)
    assert ds.seqs == ['bike', 'cows'] and len(ds) == 2
    seq = ds[0]
    assert isinstance(seq, VOSTest) and len(seq) == 4 and seq.images[0] == '00000.jpg'
    s0 = seq[0]
    np.testing.assert_array_equal(s0['current_label'], m0)
    np.testing.assert_array_equal(s0['current_img'],
                                  expected_rgb(root / 'JPEGImages/480p/bike/00000.jpg'))
    assert s0['meta'] == {'seq_name': 'bike', 'frame_num': 4, 'obj_num': 2,
                          'current_name': '00000.jpg', 'height': 480,
                          'width': int(np.ceil(W * 480 / H)), 'flip': False, 'obj_idx': [0, 1, 2]}
    s1 = seq[1]
    assert 'current_label' not in s1  # only the first annotation is given for DAVIS
    assert s1['meta']['obj_num'] == 2 and s1['meta']['obj_idx'] == [0, 1, 2]
    assert [s.seq_name for s in ds] == ['bike', 'cows']
    assert DAVIS_Test('test', str(root), 2017).seqs == ['bike']
    assert DAVIS_Test(['val', 'test'], str(root), 2017).seqs == ['bike', 'cows']
    assert listing(root.parent) == before  # readers never write (no GT copies)


def test_davis_480p_output_keeps_frame_size(tmp_path):
    root = tmp_path / 'DAVIS'
    write_frame(root / 'JPEGImages/480p/s/00000.jpg', 0, size=(480, 24))
    write_palette(root / 'Annotations/480p/s/00000.png', boxes((1, 0, 50, 0, 8), size=(480, 24)))
    (root / 'ImageSets/2017').mkdir(parents=True)
    (root / 'ImageSets/2017/val.txt').write_text('s\n')
    meta = DAVIS_Test('val', str(root))[0][0]['meta']
    assert (meta['height'], meta['width']) == (480, 24)


def test_davis2016_255_is_object_one(tmp_path):
    root = tmp_path / 'DAVIS2016'
    for t in range(3):
        write_frame(root / 'JPEGImages/480p/blackswan' / f'{t:05d}.jpg', t)
    gt = boxes((1, 4, 20, 5, 30)) * 255
    (root / 'Annotations/480p/blackswan').mkdir(parents=True)
    Image.fromarray(gt, mode='L').save(root / 'Annotations/480p/blackswan/00000.png')
    # the original 2016 package lists frames, not sequence names
    (root / 'ImageSets/480p').mkdir(parents=True)
    (root / 'ImageSets/480p/val.txt').write_text(
        '/JPEGImages/480p/blackswan/00000.jpg /Annotations/480p/blackswan/00000.png\n'
        '/JPEGImages/480p/blackswan/00001.jpg /Annotations/480p/blackswan/00001.png\n')
    ds = DAVIS_Test('val', str(root), 2016)
    assert ds.seqs == ['blackswan']
    s0 = ds[0][0]
    np.testing.assert_array_equal(s0['current_label'], gt // 255)
    assert s0['meta']['obj_idx'] == [0, 1] and s0['meta']['obj_num'] == 1


def test_real_davis2016_package(tmp_path):
    # The shared DAVIS-2016 val subset: original package layout (ImageSets/480p, 0/255 L masks).
    # The golden engine clip was cut from soapbox frame 0 by upstream's reader (cv2, RGB).
    root = shared_path('data', 'davis2016-val-dev')
    golden = np.load(shared_path('reference', 'golden', 'engine_inputs_ac.npz'))
    ds = DAVIS_Test('val', str(root), 2016)
    assert ds.seqs == ['blackswan', 'bmx-trees', 'dance-twirl', 'libby', 'soapbox']
    seq = ds[ds.index('soapbox')]
    assert len(seq) == 99 and seq.obj_indices[0] == [0, 1]
    s0 = seq[0]
    np.testing.assert_array_equal(s0['current_img'][40:200, 110:372], golden['frames_uint8'][0])
    gt = np.array(Image.open(root / 'Annotations/480p/soapbox/00000.png'))
    np.testing.assert_array_equal(s0['current_label'], (gt == 255).astype(np.uint8))
    assert (s0['meta']['height'], s0['meta']['width']) == (480, 854)


def test_davis2016_binarises_multi_object_palette(davis):
    root, m0 = davis
    (root / 'ImageSets/2016').mkdir()
    (root / 'ImageSets/2016/val.txt').write_text('cows\n')
    s0 = DAVIS_Test('val', str(root), 2016)[0][0]
    np.testing.assert_array_equal(s0['current_label'], (m0 > 0).astype(np.uint8))
    assert s0['meta']['obj_idx'] == [0, 1]


def test_davis_void_is_background(davis):
    root, m0 = davis
    m = m0.copy()
    m[0, :5] = 255
    write_palette(root / 'Annotations/480p/bike/00000.png', m)
    with pytest.warns(UserWarning, match='00000.png.*void'):
        seq = DAVIS_Test('val', str(root))[0]
        label = seq[0]['current_label']
    assert seq.obj_indices[0] == [0, 1, 2]
    np.testing.assert_array_equal(label, m0)


def test_davis_errors(davis, tmp_path):
    root, m0 = davis
    with pytest.raises(DatasetFormatError, match='nowhere'):
        DAVIS_Test('val', str(tmp_path / 'nowhere'))
    with pytest.raises(DatasetFormatError, match=r'ImageSets.2017.train\.txt'):
        DAVIS_Test('train', str(root))
    with pytest.raises(DatasetFormatError, match='Full-Resolution'):
        DAVIS_Test('val', str(root), full_resolution=True)
    # more objects than the model handles
    with pytest.raises(DatasetFormatError, match=r'bike.00000\.png.*max_obj_num=1'):
        DAVIS_Test('val', str(root), max_obj_num=1)[0]
    # RGB annotation with a colour off the palette
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[2:10, 2:12] = (255, 255, 0)
    Image.fromarray(rgb).save(root / 'Annotations/480p/bike/00000.png')
    with pytest.raises(MaskFormatError, match=r'bike.00000\.png.*255, 255, 0'):
        DAVIS_Test('val', str(root))[0]
    # mask of another size than the frame
    write_palette(root / 'Annotations/480p/bike/00000.png', boxes((1, 0, 4, 0, 4), size=(20, 40)))
    with pytest.raises(DatasetFormatError, match=r'bike.00000\.png.*40x20.*40x24'):
        DAVIS_Test('val', str(root))[0]
    # missing first-frame annotation
    os.remove(root / 'Annotations/480p/bike/00000.png')
    with pytest.raises(DatasetFormatError, match=r'bike.00000\.png.*not found'):
        DAVIS_Test('val', str(root))[0]
    # a sequence folder without frames
    for f in os.listdir(root / 'JPEGImages/480p/cows'):
        os.remove(root / 'JPEGImages/480p/cows' / f)
    with pytest.raises(DatasetFormatError, match=r'cows.*no frames'):
        DAVIS_Test('val', str(root))[1]
    # a frame of another size in the middle of a sequence
    write_frame(root / 'JPEGImages/480p/bike/00002.jpg', 2, size=(H, W + 1))
    write_palette(root / 'Annotations/480p/bike/00000.png', m0)
    seq = DAVIS_Test('val', str(root))[0]
    seq[1]
    with pytest.raises(DatasetFormatError, match=r'bike.00002\.jpg.*41x24'):
        seq[2]


# ------------------------------------------------------------------------------ YouTube-VOS

def make_youtubevos(root, year=2019, dense=False):
    """Video 'a': objects 2 and 7 from frame 00000, object 5 first annotated at 00010.
    Video 'b': its only object appears at 00005."""
    split = root / str(year) / 'valid'
    meta = {'videos': {
        'a': {'objects': {'2': {'category': 'x', 'frames': ['00000', '00005', '00010', '00015']},
                          '7': {'category': 'y', 'frames': ['00000', '00005', '00010']},
                          '5': {'category': 'z', 'frames': ['00010', '00015']}}},
        'b': {'objects': {'3': {'category': 'x', 'frames': ['00005', '00010']}}}}}
    split.mkdir(parents=True)
    (split / 'meta.json').write_text(json.dumps(meta))
    for t in (0, 5, 10, 15, 20):  # 00020 is not listed: it must be ignored
        write_frame(split / 'JPEGImages/a' / f'{t:05d}.jpg', t)
    for t in (5, 10):
        write_frame(split / 'JPEGImages/b' / f'{t:05d}.jpg', t)
    a0 = boxes((2, 0, 8, 0, 10), (7, 10, 20, 12, 30))
    a10 = boxes((5, 14, 22, 32, 38))
    b5 = boxes((3, 3, 9, 3, 9))
    write_palette(split / 'Annotations/a/00000.png', a0)
    write_palette(split / 'Annotations/a/00010.png', a10)
    write_palette(split / 'Annotations/b/00005.png', b5)
    if dense:
        for seq, frames in (('a', range(0, 22)), ('b', range(0, 14))):
            for t in frames:
                write_frame(root / str(year) / 'valid_all_frames/JPEGImages' / seq /
                            f'{t:05d}.jpg', 100 + t)
    return a0, a10, b5


def test_youtubevos_sparse(tmp_path):
    a0, a10, b5 = make_youtubevos(tmp_path / 'YTB')
    before = listing(tmp_path)
    ds = YOUTUBEVOS_Test(str(tmp_path / 'YTB'), 2019, 'val')
    assert ds.seqs == ['a', 'b']
    seq = ds[0]
    assert seq.images == ['00000.jpg', '00005.jpg', '00010.jpg', '00015.jpg']
    assert seq.obj_indices == [[0, 2, 7], [0, 2, 7], [0, 2, 7, 5], [0, 2, 7, 5]]
    assert seq.obj_nums == [2, 2, 2, 3]
    s = [seq[i] for i in range(4)]
    np.testing.assert_array_equal(s[0]['current_label'], (a0 == 2) * 1 + (a0 == 7) * 2)
    np.testing.assert_array_equal(s[2]['current_label'], (a10 == 5) * 3)
    assert 'current_label' not in s[1] and 'current_label' not in s[3]
    assert s[2]['meta']['obj_idx'] == [0, 2, 7, 5] and s[2]['meta']['obj_num'] == 2
    assert (s[0]['meta']['height'], s[0]['meta']['width']) == (H, W)  # original size
    np.testing.assert_array_equal(
        s[1]['current_img'], expected_rgb(tmp_path / 'YTB/2019/valid/JPEGImages/a/00005.jpg'))
    seq_b = ds[1]
    assert seq_b.images == ['00005.jpg', '00010.jpg'] and seq_b.obj_indices[0] == [0, 3]
    np.testing.assert_array_equal(seq_b[0]['current_label'], (b5 == 3) * 1)
    assert listing(tmp_path) == before


def test_youtubevos_dense(tmp_path):
    make_youtubevos(tmp_path / 'YTB', year=2018, dense=True)
    ds = YOUTUBEVOS_DenseTest(str(tmp_path / 'YTB'), 2018, 'val')
    seq = ds[0]
    assert seq.images == [f'{t:05d}.jpg' for t in range(0, 16)]  # cut to [first, last] sparse
    assert seq.images_sparse == ['00000.jpg', '00005.jpg', '00010.jpg', '00015.jpg']
    assert seq.obj_nums[10] == 2 and seq.obj_indices[10] == [0, 2, 7, 5]
    assert 'current_label' in seq[10] and 'current_label' not in seq[9]
    np.testing.assert_array_equal(
        seq[3]['current_img'],
        expected_rgb(tmp_path / 'YTB/2018/valid_all_frames/JPEGImages/a/00003.jpg'))
    seq_b = ds[1]
    assert seq_b.images == [f'{t:05d}.jpg' for t in range(5, 11)]
    assert seq_b.images_sparse == ['00005.jpg', '00010.jpg']


def test_youtubevos_with_transform(tmp_path):
    make_youtubevos(tmp_path / 'YTB')
    t = Compose([MultiRestrictSize(None, 1040, True, [1.0], True), MultiToTensor()])
    samples = YOUTUBEVOS_Test(str(tmp_path / 'YTB'), 2019, transform=t)[0][2]
    assert [s['meta']['flip'] for s in samples] == [False, True]
    assert tuple(samples[0]['current_img'].shape) == (3, 17, 33)
    assert tuple(samples[0]['current_label'].shape) == (1, H, W)


def test_youtubevos_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match=r'2019.valid'):
        YOUTUBEVOS_Test(str(tmp_path / 'YTB'), 2019)
    make_youtubevos(tmp_path / 'YTB')
    with pytest.raises(DatasetFormatError, match='valid_all_frames'):
        YOUTUBEVOS_DenseTest(str(tmp_path / 'YTB'), 2019)
    # the third object of video 'a' appears at 00010: that is the file named
    limited = YOUTUBEVOS_Test(str(tmp_path / 'YTB'), 2019, max_obj_num=2)
    assert limited[1].obj_indices[0] == [0, 3]
    with pytest.raises(DatasetFormatError, match=r'a.00010\.png: 3 objects.*max_obj_num=2'):
        limited[0]
    os.remove(tmp_path / 'YTB/2019/valid/JPEGImages/a/00010.jpg')
    with pytest.raises(DatasetFormatError, match=r'missing frames 00010\.jpg'):
        YOUTUBEVOS_Test(str(tmp_path / 'YTB'), 2019)[0]
    os.remove(tmp_path / 'YTB/2019/valid/meta.json')
    with pytest.raises(DatasetFormatError, match='meta.json'):
        YOUTUBEVOS_Test(str(tmp_path / 'YTB'), 2019)


# ----------------------------------------------------------------------------------- custom

def test_custom_layout(tmp_path):
    root = tmp_path / 'mydata'
    for t in range(1, 13):  # frame1 .. frame12: natural order, not string order
        write_frame(root / 'JPEGImages/walk' / f'frame{t}.jpg', t)
    first = boxes((3, 2, 10, 2, 10), (9, 12, 20, 20, 30))
    later = boxes((4, 0, 6, 30, 40))
    write_palette(root / 'Annotations/walk/frame3.png', first)  # annotated from frame 3 on
    write_palette(root / 'Annotations/walk/frame10.png', later)
    write_frame(root / 'JPEGImages/single/0.jpg', 0)  # a 1-frame video
    write_palette(root / 'Annotations/single/0.png', boxes((1, 1, 5, 1, 5)))
    before = listing(tmp_path)

    ds = CustomTest(str(root))
    assert ds.seqs == ['single', 'walk']
    seq = ds[1]
    assert seq.images == [f'frame{t}.jpg' for t in range(3, 13)]
    assert seq.obj_indices[0] == [0, 3, 9] and seq.obj_indices[7] == [0, 3, 9, 4]
    assert seq.obj_nums[0] == 2 and seq.obj_nums[7] == 2 and seq.obj_nums[8] == 3
    np.testing.assert_array_equal(seq[7]['current_label'], (later == 4) * 3)
    np.testing.assert_array_equal(seq[0]['current_img'],
                                  expected_rgb(root / 'JPEGImages/walk/frame3.jpg'))
    single = ds[0]
    assert len(single) == 1 and single.obj_nums == [1]
    assert single[0]['meta']['obj_num'] == 1
    np.testing.assert_array_equal(single[0]['current_label'], boxes((1, 1, 5, 1, 5)))
    assert listing(tmp_path) == before


def test_custom_errors(tmp_path):
    root = tmp_path / 'c'
    (root / 'Annotations').mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r'c.JPEGImages'):
        CustomTest(str(root))
    write_frame(root / 'JPEGImages/v/00000.jpg', 0)
    write_frame(root / 'JPEGImages/v/00001.jpg', 1)
    with pytest.raises(DatasetFormatError, match=r'Annotations.v'):
        CustomTest(str(root))
    write_palette(root / 'Annotations/v/00000.png', boxes((1, 0, 5, 0, 5)))
    write_palette(root / 'Annotations/v/00007.png', boxes((2, 0, 5, 0, 5)))
    with pytest.raises(DatasetFormatError, match=r'00007\.png.*no matching frame'):
        CustomTest(str(root))[0]
    os.remove(root / 'Annotations/v/00007.png')
    write_palette(root / 'Annotations/v/00001.png', boxes((2, 0, 5, 0, 5), size=(H + 2, W)))
    with pytest.raises(DatasetFormatError, match=r'v.00001\.png.*mask is 40x26'):
        CustomTest(str(root))[0]
    os.remove(root / 'Annotations/v/00001.png')
    assert len(CustomTest(str(root))[0]) == 2
    write_palette(root / 'Annotations/v/00000.png', np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetFormatError, match=r'v.00000\.png.*no object'):
        CustomTest(str(root))[0]
    write_palette(root / 'Annotations/v/00000.png', boxes((1, 0, 5, 0, 5)))
    # a folder of Annotations without frames
    os.makedirs(root / 'JPEGImages/empty')
    os.makedirs(root / 'Annotations/empty')
    with pytest.raises(DatasetFormatError, match=r'empty.*no frames'):
        CustomTest(str(root))[0]
    # an RGB annotation with palette colours works, one with another colour names the file
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[2:10, 2:12] = (0, 128, 0)  # palette colour of id 2
    Image.fromarray(rgb).save(root / 'Annotations/v/00000.png')
    seq = CustomTest(str(root), seqs=['v'])[0]
    assert seq.obj_indices[0] == [0, 2]
    rgb[2:10, 2:12] = (250, 10, 250)
    Image.fromarray(rgb).save(root / 'Annotations/v/00000.png')
    with pytest.raises(MaskFormatError, match=r'v.00000\.png.*250, 10, 250'):
        CustomTest(str(root), seqs=['v'])[0]
