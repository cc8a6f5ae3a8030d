"""Mask / frame I/O: every mask format users have decodes to the same id map; errors name files."""
import os
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import shared_path
from utils.image import (DAVIS_PALETTE, MaskFormatError, MaskWarning, _palette, overlay_mask,
                         read_image, read_mask, save_mask)


def voc_colour(i):
    """Independent VOC colour map: bits (0,3,6) -> R, (1,4,7) -> G, (2,5) -> B, MSB first."""
    r = g = b = 0
    for k in range(8):
        r |= ((i >> (3 * k)) & 1) << (7 - k)
        g |= ((i >> (3 * k + 1)) & 1) << (7 - k)
        b |= ((i >> (3 * k + 2)) & 1) << (7 - k)
    return r, g, b


VOC = np.array([voc_colour(i) for i in range(256)], dtype=np.uint8)


@pytest.fixture(scope='module')
def ids():
    """(60, 80) id map with non-contiguous ids {0, 2, 7}: a box and an ellipse that touch."""
    h, w = 60, 80
    m = np.zeros((h, w), np.uint8)
    m[6:34, 6:40] = 2
    yy, xx = np.mgrid[:h, :w]
    m[((yy - 36) / 17.) ** 2 + ((xx - 50) / 20.) ** 2 <= 1] = 7
    return m


def _write_palette_png(m, path, palette):
    img = Image.fromarray(m, mode='L').convert('P')
    img.putpalette([int(v) for v in np.asarray(palette).ravel()])
    img.save(path)


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # clean masks must not warn
        return read_mask(path)


def test_palettes():
    assert len(DAVIS_PALETTE) == 768 and len(_palette) == 768
    np.testing.assert_array_equal(np.array(DAVIS_PALETTE).reshape(-1, 3), VOC)
    up = np.array(_palette).reshape(-1, 3)
    # upstream: VOC colours for 0..21 written with 191 instead of 192, then a grey ramp
    expected = VOC[:22].astype(int)
    expected[expected == 192] = 191
    np.testing.assert_array_equal(up[:22], expected)
    np.testing.assert_array_equal(up[22:], np.repeat(np.arange(22, 256)[:, None], 3, 1))
    assert tuple(up[1]) == (128, 0, 0) and tuple(up[2]) == (0, 128, 0)


def test_davis_palette_matches_real_annotation():
    folder = shared_path('data', 'davis2017-val-osvos-results', 'soapbox')
    with Image.open(folder / '00000.png') as img:
        assert img.mode == 'P'
        np.testing.assert_array_equal(np.array(img.getpalette()[:768]), np.array(DAVIS_PALETTE))


def test_palette_png_and_grayscale_ids(ids, tmp_path):
    for name, palette in (('voc.png', VOC), ('upstream.png', np.array(_palette))):
        _write_palette_png(ids, tmp_path / name, palette)
        out = _read(tmp_path / name)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, ids)
    Image.fromarray(ids, mode='L').save(tmp_path / 'gray_ids.png')
    np.testing.assert_array_equal(_read(tmp_path / 'gray_ids.png'), ids)


def test_binary_variants(ids, tmp_path):
    obj = (ids == 2).astype(np.uint8)
    Image.fromarray(obj * 255, mode='L').save(tmp_path / 'l255.png')
    Image.fromarray(obj, mode='L').save(tmp_path / 'l01.png')
    Image.fromarray(obj.astype(bool)).save(tmp_path / 'bit.png')
    Image.fromarray(np.repeat(obj[..., None] * 255, 3, -1)).save(tmp_path / 'rgb_white.png')
    for name in ('l255.png', 'l01.png', 'bit.png', 'rgb_white.png'):
        np.testing.assert_array_equal(_read(tmp_path / name), obj, err_msg=name)


def test_gray_rgb(ids, tmp_path):
    # white-on-black saved as RGB with anti-aliased edges: still the binary object
    obj = (ids == 2).astype(np.uint8)
    Image.fromarray(cv2.GaussianBlur(np.repeat(obj[..., None] * 255, 3, -1), (3, 3), 0.5)).save(
        tmp_path / 'aa_white.png')
    with pytest.warns(MaskWarning, match='aa_white.png'):
        np.testing.assert_array_equal(read_mask(tmp_path / 'aa_white.png'), obj)
    # a rendering whose only object is id 7, the palette's grey (128, 128, 128)
    only7 = np.where(ids == 7, 7, 0).astype(np.uint8)
    Image.fromarray(VOC[only7]).save(tmp_path / 'grey7.png')
    np.testing.assert_array_equal(_read(tmp_path / 'grey7.png'), only7)


def test_rgb_and_rgba(ids, tmp_path):
    Image.fromarray(VOC[ids]).save(tmp_path / 'rgb.png')
    np.testing.assert_array_equal(_read(tmp_path / 'rgb.png'), ids)
    up = np.array(_palette, dtype=np.uint8).reshape(-1, 3)
    Image.fromarray(up[ids]).save(tmp_path / 'rgb_upstream.png')
    np.testing.assert_array_equal(_read(tmp_path / 'rgb_upstream.png'), ids)
    rgba = np.concatenate([VOC[ids], np.full(ids.shape + (1,), 255, np.uint8)], -1)
    Image.fromarray(rgba, mode='RGBA').save(tmp_path / 'rgba_opaque.png')
    np.testing.assert_array_equal(_read(tmp_path / 'rgba_opaque.png'), ids)
    # transparent background painted an arbitrary (non-palette) colour: alpha wins
    rgba[ids == 0] = (255, 0, 255, 0)
    Image.fromarray(rgba, mode='RGBA').save(tmp_path / 'rgba.png')
    np.testing.assert_array_equal(_read(tmp_path / 'rgba.png'), ids)


def test_antialiased_rgb_is_snapped_with_warning(ids, tmp_path):
    blurred = cv2.GaussianBlur(VOC[ids], (3, 3), 0.5)
    assert len(np.unique(blurred.reshape(-1, 3), axis=0)) > 3  # really anti-aliased
    path = tmp_path / 'aa.png'
    Image.fromarray(blurred).save(path)
    with pytest.warns(MaskWarning, match='aa.png'):
        out = read_mask(path)
    np.testing.assert_array_equal(out, ids)


def test_phantom_palette_id_named_and_removed(tmp_path):
    m = np.zeros((40, 40), np.uint8)
    m[8:30, 10:32] = 1
    rgb = VOC[m]
    # object border pixels hold (96, 0, 0): exactly VOC id 72, a blend of red (128,0,0) and black
    inner = np.zeros_like(m, bool)
    inner[9:29, 11:31] = True
    border = (m == 1) & ~inner
    rgb[border] = VOC[72]
    assert tuple(VOC[72]) == (96, 0, 0)
    path = tmp_path / 'phantom.png'
    Image.fromarray(rgb).save(path)
    with pytest.warns(MaskWarning, match=r'phantom\.png.*id 72') as rec:
        out = read_mask(path)
    assert f'({int(border.sum())} px)' in str(rec[0].message)
    np.testing.assert_array_equal(out, m)


def test_antialiased_binary_gray(ids, tmp_path):
    obj = (ids == 2).astype(np.uint8)
    blurred = cv2.GaussianBlur(obj * 255, (3, 3), 0.5)
    path = tmp_path / 'aa_gray.png'
    Image.fromarray(blurred, mode='L').save(path)
    with pytest.warns(MaskWarning, match='aa_gray.png'):
        out = read_mask(path)
    np.testing.assert_array_equal(out, obj)


def test_resized_index_mask_warns_phantom_ids_but_keeps_them(ids, tmp_path):
    resized = cv2.resize(ids, (160, 120), interpolation=cv2.INTER_LINEAR)
    assert set(np.unique(resized)) - {0, 2, 7}
    path = tmp_path / 'resized.png'
    _write_palette_png(resized, path, VOC)
    with pytest.warns(MaskWarning, match='resized.png.*phantom'):
        out = read_mask(path)
    np.testing.assert_array_equal(out, resized)


def test_bad_colour_names_file_and_colour(ids, tmp_path):
    rgb = VOC[ids].copy()
    rgb[ids == 7] = (255, 255, 0)  # not a palette colour
    path = tmp_path / 'yellow.png'
    Image.fromarray(rgb).save(path)
    with pytest.raises(MaskFormatError, match=r'yellow\.png.*\(255, 255, 0\)'):
        read_mask(path)


def test_unreadable_missing_wrong_size_and_max_id(ids, tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'\x89PNG not really')
    with pytest.raises(MaskFormatError, match='broken.png'):
        read_mask(bad)
    with pytest.raises(FileNotFoundError, match='nothere.png'):
        read_mask(tmp_path / 'nothere.png')
    _write_palette_png(ids, tmp_path / 'm.png', VOC)
    with pytest.raises(MaskFormatError, match=r'm\.png.*80x60.*81x60'):
        read_mask(tmp_path / 'm.png', size=(60, 81))
    np.testing.assert_array_equal(read_mask(tmp_path / 'm.png', size=(60, 80)), ids)
    with pytest.raises(MaskFormatError, match=r'm\.png.*\[7\]'):
        read_mask(tmp_path / 'm.png', max_id=5)


def test_sixteen_bit_ids(tmp_path):
    m = np.zeros((20, 20), np.uint16)
    m[2:12, 2:12] = 300
    path = tmp_path / 'i16.png'
    Image.fromarray(m).save(path)
    out = read_mask(path)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, m)


def test_save_mask_round_trip_palette_and_dirs(ids, tmp_path):
    path = tmp_path / 'a' / 'b' / '00000.png'
    save_mask(ids, path)
    with Image.open(path) as img:
        assert img.mode == 'P'
        np.testing.assert_array_equal(np.array(img), ids)
        assert img.getpalette()[:768] == _palette
    # tensors (1, H, W) and a custom palette
    save_mask(torch.from_numpy(ids[None].astype(np.int64)), path, palette=DAVIS_PALETTE)
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.array(img), ids)
        assert img.getpalette()[:768] == DAVIS_PALETTE
    assert os.listdir(path.parent) == ['00000.png']
    with pytest.raises(ValueError, match='0..255'):
        save_mask(np.full((4, 4), 256), tmp_path / 'x.png')


def test_save_mask_is_atomic(ids, tmp_path, monkeypatch):
    path = tmp_path / 'res.png'
    save_mask(ids, path)
    before = path.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(Image.Image, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        save_mask(np.zeros_like(ids), path)
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ['res.png']  # no temp file left behind


def test_read_image(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / 'f.png')
    out = read_image(tmp_path / 'f.png')
    assert out.dtype == np.uint8 and out.shape == (13, 17, 3)
    np.testing.assert_array_equal(out, rgb)
    Image.fromarray(rgb).save(tmp_path / 'f.jpg', quality=90)
    np.testing.assert_array_equal(read_image(tmp_path / 'f.jpg'),
                                  cv2.imread(str(tmp_path / 'f.jpg'))[:, :, ::-1])
    (tmp_path / 'bad.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(ValueError, match='bad.jpg'):
        read_image(tmp_path / 'bad.jpg')
    with pytest.raises(FileNotFoundError, match='none.jpg'):
        read_image(tmp_path / 'none.jpg')


def test_overlay_mask(ids):
    image = np.full(ids.shape + (3,), 200, np.uint8)
    out = overlay_mask(image, ids, alpha=0.5)
    up = np.array(_palette, dtype=np.float64).reshape(-1, 3)
    np.testing.assert_array_equal(out[ids == 0], image[ids == 0])
    # an interior pixel of object 2 is the 50/50 blend; a border pixel is the pure colour
    assert tuple(out[20, 20]) == tuple(np.rint(0.5 * 200 + 0.5 * up[2]).astype(np.uint8))
    assert tuple(out[6, 20]) == tuple(up[2].astype(np.uint8))
    assert tuple(overlay_mask(image, ids, contour=False)[6, 20]) == tuple(out[20, 20])
