"""Mask and frame I/O: the DAVIS palette, reading masks in the formats users have, atomic writes.

An *id map* is an ``(H, W)`` integer array whose value is the object id (0 = background).
Object ids are written as indexed (mode ``'P'``) PNGs; the palette only matters for display.

``read_mask`` accepts the formats masks come in:

- palette PNG (``'P'``): the palette indices are the ids (what the DAVIS toolkit reads), except
  index 255 (:data:`VOID_ID`), which is **void** everywhere in this project (DAVIS-2017 marks
  unlabelled pixels with it): it is read as background, with a :class:`MaskWarning`, in the
  demo, the Python API and evaluation alike (training keeps it as "ignore" in the loss). So
  palette masks hold objects 1..254;
- grayscale (``'L'``, ``'I;16'``, ``'I'``): values are ids, except a binary 0/255 mask which
  becomes {0, 1} (the DAVIS-2016 convention);
- ``'1'`` bit masks: {0, 1};
- RGB / RGBA renderings whose colours are palette colours: colours are mapped back to ids.
  Anti-aliased edges (blend colours between two objects, which sometimes hit another palette
  colour exactly and would become a tiny "phantom" object) are snapped to the nearest colour
  that covers a solid area, with a warning naming the file.

Anything else (a solid area of a non-palette colour, an unreadable file, an unsupported mode)
raises :class:`MaskFormatError` naming the file.
"""
import functools
import os
import warnings

import numpy as np
from PIL import Image

from utils.io import atomic_write


class MaskFormatError(ValueError):
    """A mask file that cannot be turned into an id map; the message names the file."""


class MaskWarning(UserWarning):
    """A mask was read but had to be repaired (anti-aliased edges, near-palette colours...)."""


VOID_ID = 255  # palette index of void ("not labelled") pixels, read as background


def drop_void(ids, path, void_id=VOID_ID):
    """``ids`` with ``void_id`` pixels set to 0 (background), warning with the count."""
    void = ids == void_id
    if void.any():
        warnings.warn(f'{path}: {int(void.sum())} px with the void value {void_id} are read as '
                      f'background (void is ignored, never an object)', MaskWarning,
                      stacklevel=3)
        ids = np.where(void, 0, ids)
    return ids


def voc_colormap(n=256):
    """The PASCAL-VOC / DAVIS colour map: ``(n, 3)`` uint8, bits of the id spread over R, G, B.

    Bit ``3k + c`` of the id sets bit ``7 - k`` of channel ``c``; DAVIS ground truth ships with it.
    """
    ids = np.arange(n, dtype=np.int64)
    cmap = np.zeros((n, 3), dtype=np.int64)
    for k in range(8):
        for c in range(3):
            cmap[:, c] |= ((ids >> (3 * k + c)) & 1) << (7 - k)
    return cmap.astype(np.uint8)


def _upstream_palette():
    # aot-benchmark's palette: VOC colours for ids 0..21 but with 191 where VOC has 192
    # (ids 9, 11, 13, 15, 18, 19), then a grey ramp (i, i, i) for ids 22..255. Kept byte for byte
    # so that our PNGs are identical to upstream's.
    cmap = voc_colormap(22)
    cmap[cmap == 192] = 191
    grey = np.repeat(np.arange(22, 256, dtype=np.uint8)[:, None], 3, axis=1)
    return [int(v) for v in np.concatenate([cmap, grey]).ravel()]


_palette = _upstream_palette()
"""Flat 768-entry palette written into every result PNG (upstream's ``utils.image._palette``)."""

DAVIS_PALETTE = [int(v) for v in voc_colormap(256).ravel()]
"""The exact VOC colour map (192, not 191), as found in DAVIS / YouTube-VOS annotation PNGs."""

# Solid colour regions may be this far (RGB Euclidean) from a palette colour and still count as it
# (lossy re-encodes, 191-vs-192 palettes); further away is an error.
_SOLID_COLOUR_TOL = 8.0
# An edge colour must lie within this distance of a blend of two solid colours to be snapped.
_EDGE_BLEND_TOL = 48.0


def _as_palette_array(palette):
    pal = np.asarray(palette, dtype=np.int64).reshape(-1)
    if pal.size % 3 or pal.size > 768 or pal.min() < 0 or pal.max() > 255:
        raise ValueError(f'a palette is a flat list of at most 256 RGB triplets in 0..255, '
                         f'got {pal.size} values')
    return pal.reshape(-1, 3)


@functools.lru_cache(maxsize=8)
def _cached_colour_table(palette):
    return _build_colour_table(None if palette is None else list(palette))


def _colour_table(palette=None):
    key = None if palette is None else tuple(int(v) for v in np.asarray(palette).ravel())
    return _cached_colour_table(key)


def _build_colour_table(palette=None):
    """``(codes, ids, colours)`` of the colours ``read_mask`` recognises in RGB masks.

    Default: the exact VOC map first, then upstream's variants (191s, grey ramp) for ids whose
    colour is not already taken, so renderings of either palette decode.
    """
    tables = [_as_palette_array(palette)] if palette is not None else [
        _as_palette_array(DAVIS_PALETTE), _as_palette_array(_palette)]
    lut = {}
    for table in tables:
        codes = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
        for idx, code in enumerate(codes.tolist()):
            lut.setdefault(code, idx)
    codes = np.array(sorted(lut), dtype=np.int64)
    ids = np.array([lut[c] for c in codes.tolist()], dtype=np.int64)
    colours = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1)
    return codes, ids, colours


def _interior(values):
    """``(H, W)`` bool: the pixel and its 8 neighbours hold one value (borders replicated)."""
    padded = np.pad(values, 1, mode='edge')
    h, w = values.shape
    inside = np.ones((h, w), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            if dy == 1 and dx == 1:
                continue
            inside &= padded[dy:dy + h, dx:dx + w] == values
    return inside


def _solid_values(values):
    """Sorted unique values of ``values`` that cover at least one 3x3 solid area."""
    return np.unique(values[_interior(values)])


def _warn_phantom_ids(ids, path):
    # Index masks are kept as they are (a real object may be tiny), but ids without any solid
    # area are typical of masks resized with interpolation; say so. 255 is DAVIS's void label,
    # often a thin band along object borders: not suspicious.
    present, counts = np.unique(ids, return_counts=True)
    solid = set(_solid_values(ids).tolist())
    thin = [(int(v), int(c)) for v, c in zip(present, counts)
            if v not in (0, 255) and int(v) not in solid]
    if thin and solid - {0}:
        desc = ', '.join(f'id {v} ({c} px)' for v, c in thin)
        warnings.warn(f'{path}: no 3x3 area is covered by {desc}; if the mask was resized or '
                      f'anti-aliased these are phantom ids (kept as they are)', MaskWarning,
                      stacklevel=3)


def _segment_distance(points, a, b):
    """Distance of each of ``points`` ``(N, 3)`` to every segment ``a[j]-b[j]``: ``(N, J)``."""
    ab = (b - a)[None]                                     # (1, J, 3)
    ap = points[:, None, :] - a[None]                      # (N, J, 3)
    denom = np.maximum((ab * ab).sum(-1), 1e-12)
    t = np.clip((ap * ab).sum(-1) / denom, 0.0, 1.0)
    closest = a[None] + t[..., None] * ab
    return np.linalg.norm(points[:, None, :] - closest, axis=-1)


def _decode_colours(rgb, path, palette):
    """RGB ``(H, W, 3)`` uint8 rendering of an id map -> ``(H, W)`` int64 ids."""
    h, w, _ = rgb.shape
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) \
        | rgb[..., 2].astype(np.int64)
    uniq, inverse, counts = np.unique(codes.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(h, w)
    colours = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float64)
    solid = np.zeros(len(uniq), dtype=bool)
    solid[np.unique(inverse[_interior(inverse)])] = True

    table_codes, table_ids, table_colours = _colour_table(palette)
    pos = np.searchsorted(table_codes, uniq)
    pos = np.minimum(pos, len(table_codes) - 1)
    exact = table_codes[pos] == uniq
    ids = np.where(exact, table_ids[pos], -1)

    near_notes = []
    for k in np.flatnonzero(solid & ~exact):
        dist = np.linalg.norm(table_colours - colours[k], axis=1)
        j = int(np.argmin(dist))
        rgb_k = tuple(int(v) for v in colours[k])
        if dist[j] > _SOLID_COLOUR_TOL:
            raise MaskFormatError(
                f'{path}: colour {rgb_k} covers {counts[k]} px and is not a palette colour '
                f'(nearest {tuple(int(v) for v in table_colours[j])} = id {table_ids[j]}); '
                f'save masks as indexed (palette) PNGs whose index is the object id, or paint '
                f'objects with DAVIS palette colours')
        ids[k] = table_ids[j]
        near_notes.append(f'{rgb_k} -> id {table_ids[j]} ({counts[k]} px)')
    if not solid.any():
        raise MaskFormatError(f'{path}: no colour covers a 3x3 area; this does not look like a '
                              f'mask (a photo or a heavily blurred mask?)')

    solid_idx = np.flatnonzero(solid)
    edge_idx = np.flatnonzero(~solid)
    phantom_notes, snapped_px = [], 0
    if len(edge_idx):
        # Anti-aliasing blends neighbouring objects; map each blend to the closest solid colour,
        # but refuse colours that are no blend of two solid colours (a stray drawing, noise...).
        sc = colours[solid_idx]
        ia, ib = np.triu_indices(len(sc))
        blend_dist, nearest = [], []
        for start in range(0, len(edge_idx), 1024):  # bounded (chunk, pairs, 3) temporaries
            pts = colours[edge_idx[start:start + 1024]]
            blend_dist.append(_segment_distance(pts, sc[ia], sc[ib]).min(axis=1))
            nearest.append(np.linalg.norm(pts[:, None] - sc[None], axis=-1).argmin(axis=1))
        blend_dist, nearest = np.concatenate(blend_dist), np.concatenate(nearest)
        solid_ids = set(ids[solid_idx].tolist())
        for e, k in enumerate(edge_idx):
            rgb_k = tuple(int(v) for v in colours[k])
            if blend_dist[e] > _EDGE_BLEND_TOL:
                raise MaskFormatError(
                    f'{path}: colour {rgb_k} ({counts[k]} px) is neither a palette colour of a '
                    f'solid area nor a blend of two of them; cannot tell which object it is')
            target = int(ids[solid_idx[nearest[e]]])
            if exact[k] and ids[k] not in solid_ids:
                phantom_notes.append(f'id {ids[k]} ({counts[k]} px)')
            ids[k] = target
            snapped_px += int(counts[k])
    if near_notes or snapped_px:
        msg = [f'{path}: RGB mask repaired:']
        if snapped_px:
            msg.append(f'{snapped_px} anti-aliased edge px snapped to the nearest solid colour')
        if phantom_notes:
            more = f' and {len(phantom_notes) - 12} more' if len(phantom_notes) > 12 else ''
            msg.append('phantom ids removed: ' + ', '.join(phantom_notes[:12]) + more)
        if near_notes:
            msg.append('near-palette colours taken as palette colours: ' + ', '.join(near_notes))
        warnings.warn(' '.join(msg[:1]) + ' ' + '; '.join(msg[1:]), MaskWarning, stacklevel=3)
    return ids[inverse]


def _binary_or_ids(values, path):
    """Grayscale values -> ids: {0, 255} is a binary mask, anything else holds ids already."""
    present = np.unique(values)
    if present.max(initial=0) == 255 and set(present.tolist()) <= {0, 255}:
        return (values == 255).astype(np.int64)
    if present.max(initial=0) == 255 and len(present) > 2:
        solid = set(_solid_values(values).tolist())
        if solid <= {0, 255} and 255 in solid:
            # A 0/255 mask whose edges were anti-aliased (grey ramps between the two levels).
            n_edge = int(((values != 0) & (values != 255)).sum())
            warnings.warn(f'{path}: binary 0/255 mask with {n_edge} anti-aliased edge px; '
                          f'thresholded at 128', MaskWarning, stacklevel=3)
            return (values >= 128).astype(np.int64)
    _warn_phantom_ids(values, path)
    return values.astype(np.int64)


def _is_grayscale_mask(rgb, palette):
    """True for an RGB image with R = G = B that is not a rendering of palette greys."""
    gray = rgb[..., 0]
    if not ((rgb[..., 1] == gray).all() and (rgb[..., 2] == gray).all()):
        return False
    # Decide on the greys of solid areas, so anti-aliased edges do not change the answer.
    solid = set(_solid_values(gray).tolist())
    if solid <= {0, 255} or solid <= {0, 1}:
        return True
    table_codes = set(_colour_table(palette)[0].tolist())
    return not all(v * 0x010101 in table_codes for v in solid)


def load_mask_array(path):
    """``(PIL mode, array)`` of a mask file, decoded as stored (no id mapping).

    The one place mask files are opened (:func:`read_mask`, the training sets'
    ``read_mask``, the J&F reader in :mod:`utils.metrics`); each interprets the pixels its
    own way. Raises ``FileNotFoundError`` for a missing file and :class:`MaskFormatError`
    (a ``ValueError``) for one PIL cannot decode, both naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: mask file not found')
    try:
        with Image.open(path) as img:
            img.load()
            return img.mode, np.array(img)
    except Exception as exc:  # PIL raises a handful of unrelated types for broken files
        raise MaskFormatError(f'cannot read mask {path} ({type(exc).__name__}: {exc})') \
            from exc


def read_mask(path, *, palette=None, max_id=None, size=None, void_id=VOID_ID):
    """Read a mask file as an ``(H, W)`` id map (uint8 when every id fits, else int32).

    Args:
        path: PNG (or any lossless image PIL reads) holding one object id per pixel.
        palette: colours accepted for RGB/RGBA masks (flat list, index = id). Default: the DAVIS
            VOC colour map plus upstream's variants.
        max_id: if given, ids above it raise :class:`MaskFormatError`.
        size: if given, the ``(H, W)`` the mask must have (its frame's size).
        void_id: palette index read as background (void), default 255; ``None`` keeps it as an
            id. Only palette (``'P'``) masks have void; in grayscale masks 255 is an id (or the
            object of a binary 0/255 mask).

    Ids are not renumbered: non-contiguous ids (e.g. {0, 2, 7}) stay as they are.
    """
    path = os.fspath(path)
    mode, arr = load_mask_array(path)
    if mode == 'P':
        ids = arr.astype(np.int64)
        if void_id is not None:
            ids = drop_void(ids, path, void_id)
        _warn_phantom_ids(ids, path)
    elif mode == '1':
        ids = arr.astype(np.int64)
    elif mode in ('L', 'I;16', 'I;16B', 'I;16L', 'I'):
        if arr.min() < 0:
            raise MaskFormatError(f'{path}: negative values in a mask')
        ids = _binary_or_ids(arr.astype(np.int64), path)
    elif mode == 'LA':
        gray = np.where(arr[..., 1] == 0, 0, arr[..., 0]).astype(np.int64)
        ids = _binary_or_ids(gray, path)
    elif mode in ('RGB', 'RGBA'):
        rgb = arr[..., :3].copy()
        if mode == 'RGBA':
            rgb[arr[..., 3] == 0] = 0  # fully transparent = background, whatever its colour
        gray = rgb[..., 0].astype(np.int64)
        if _is_grayscale_mask(rgb, palette):
            # A grayscale mask saved as RGB (binary 0/255 or 0/1, or grey ids): read it as 'L'.
            ids = _binary_or_ids(gray, path)
        else:
            ids = _decode_colours(rgb, path, palette)
            if void_id is not None:  # a rendering of a palette mask: its void colour is void
                ids = drop_void(ids, path, void_id)
    else:
        raise MaskFormatError(f'{path}: unsupported image mode {mode!r} for a mask; use an '
                              f'indexed (P), grayscale (L) or RGB PNG')
    if ids.ndim != 2:
        raise MaskFormatError(f'{path}: expected a single-channel mask, got shape {arr.shape}')
    if size is not None and tuple(ids.shape) != tuple(size):
        raise MaskFormatError(f'{path}: mask is {ids.shape[1]}x{ids.shape[0]} (WxH) but the '
                              f'frame is {size[1]}x{size[0]}; masks must have the frame size')
    top = int(ids.max(initial=0))
    if max_id is not None and top > max_id:
        bad = [int(v) for v in np.unique(ids) if v > max_id]
        raise MaskFormatError(f'{path}: object ids {bad} exceed the maximum id {max_id}')
    return ids.astype(np.uint8 if top <= 255 else np.int32)


def save_mask(mask, path, palette=None):
    """Write an ``(H, W)`` id map as an indexed PNG, atomically (temp file + rename).

    Args:
        mask: ``(H, W)`` integer array or tensor, ids in 0..255.
        path: destination; parent folders are created.
        palette: flat RGB list (index = id); default :data:`_palette` (upstream's).
    """
    if hasattr(mask, 'detach'):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f'{path}: a mask is (H, W), got shape {mask.shape}')
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f'{path}: ids must be in 0..255 for an indexed PNG, got '
                         f'{int(mask.min())}..{int(mask.max())}')
    pal = _as_palette_array(_palette if palette is None else palette)
    img = Image.fromarray(mask.astype(np.uint8), mode='L').convert('P')  # 'P' keeps the indices
    img.putpalette([int(v) for v in pal.ravel()])
    atomic_write(path, lambda f: img.save(f, format='PNG'))


def read_image(path, apply_exif=True):
    """Read a frame as RGB ``(H, W, 3)`` uint8.

    Decoded with OpenCV as upstream does, so pixel values match the reference pipeline bit for
    bit. ``apply_exif``: rotate by the EXIF orientation (OpenCV's default, upstream's
    inference); the training sets pass ``False`` because their masks (PNG) carry none, and a
    rotated image would no longer sit on its mask.
    """
    import cv2
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: frame not found')
    flags = cv2.IMREAD_COLOR if apply_exif else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imread(path, flags)
    if bgr is None:
        # cv2.imread cannot open some non-ASCII paths; decode from memory before giving up.
        try:
            bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags)
        except (OSError, ValueError):
            bgr = None
    if bgr is None:
        raise ValueError(f'{path}: cannot decode the image (corrupt or unsupported format)')
    return np.ascontiguousarray(bgr[:, :, ::-1])


def image_size(path):
    """``(H, W)`` of an image file as :func:`read_image` would return it, without decoding it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: file not found')
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1) if img.format == 'JPEG' else 1
    except Exception as exc:
        raise ValueError(f'{path}: cannot read the image ({type(exc).__name__}: {exc})') from exc
    # EXIF orientations 5..8 are rotated by 90 degrees on decode.
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def colorize_mask(mask, palette=None):
    """``(H, W)`` ids -> ``(H, W, 3)`` uint8 colours of ``palette`` (default :data:`_palette`)."""
    pal = _as_palette_array(_palette if palette is None else palette).astype(np.uint8)
    pal = np.concatenate([pal, np.zeros((256 - len(pal), 3), np.uint8)])
    return pal[np.asarray(mask).astype(np.int64) & 255]


def overlay_mask(image, mask, alpha=0.5, palette=None, contour=True):
    """Blend object colours over a frame and outline each object, for viewing results.

    Args:
        image: ``(H, W, 3)`` uint8 RGB frame.
        mask: ``(H, W)`` id map (0 = background, left untouched).
        alpha: weight of the object colour inside objects.
        contour: draw a 1-px outline in the object's own colour at full strength.
    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape[:2] != mask.shape:
        raise ValueError(f'overlay: image {image.shape[:2]} and mask {mask.shape} differ in size')
    colours = colorize_mask(mask, palette).astype(np.float32)
    fg = (mask > 0)[..., None]
    out = np.where(fg, image.astype(np.float32) * (1 - alpha) + colours * alpha,
                   image.astype(np.float32))
    if contour:
        padded = np.pad(mask, 1, mode='edge')
        h, w = mask.shape
        edge = np.zeros((h, w), dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            edge |= padded[dy:dy + h, dx:dx + w] != mask
        edge &= mask > 0
        out[edge] = colours[edge]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
