"""Training datasets: synthetic clips from static images, and VOS clips.

Every item is one training clip::

    ref_img, prev_img       (3, H, W) float32, ImageNet-normalised
    curr_img                list of seq_len - 2 such tensors
    ref_label, prev_label   (1, H, W) int64, ids contiguous in 0..obj_num
    curr_label              list of seq_len - 2 such tensors
    meta                    {'seq_name': str, 'frame_num': int, 'obj_num': int <= max_obj_n}

(with ``enable_prev_frame`` a VOS clip has seq_len - 1 current frames, as upstream).

Datasets:
- ``StaticTrain``: image + mask pairs become clips by random affine warps (upstream's
  pre-training data). Any folder works: upstream's ``JPEGImages/<DS>/`` + ``Annotations/<DS>/``
  trees (DAVIS frames too), or a flat/nested folder of ``<stem>.jpg`` + ``<stem>.png``.
- ``DAVIS2017_Train`` (also DAVIS-2016, whose 0/255 masks hold object 1) and
  ``YOUTUBEVOS_Train``, on the ``VOSTrain`` sampler.
- ``build_train_dataset(cfg)`` concatenates those named in ``cfg.DATASETS``.

Images and masks are always paired by file stem, never by position in a sorted list, and
the data is checked: an image without its mask (or the reverse), a mask whose size differs
from its image, an empty folder or split file raise an error naming the file.

Reproducibility: nothing here touches a global RNG. Item ``idx`` draws every random choice
(frame sampling, augmentation, merging) from a generator seeded by
``(seed, dataset salt, epoch, idx)``, so a given seed gives the same clips whatever the
number of DataLoader workers or the order in which workers fetch them. Call
``set_epoch(epoch)`` (before creating the epoch's iterator) to get fresh clips each epoch.
"""
import json
import logging
import os
import random
import zlib

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from utils.image import load_mask_array
from utils.image import read_image as read_rgb

from . import image_transforms as IT
# VOID_ID: "neither object nor background" (COCO crowd regions, DAVIS-2017 void, the unread
# masks of label-free clips): never an object, ignored by the losses, no ID embedding.
from .video_transforms import (VOID_ID, ToTensor, all_images, all_labels, image_to_tensor,
                               label_to_tensor, train_transforms_from_cfg)

logger = logging.getLogger(__name__)

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
MASK_EXT = '.png'
# Folder pairs tried, in order, by find_image_mask_pairs: upstream's static layout, then the
# images/ + masks/ layout of COCO-style exports (e.g. coco128-static).
STATIC_LAYOUTS = (('JPEGImages', 'Annotations'), ('images', 'masks'))


# ----------------------------------------------------------------------------------------
# seeding


def sample_rng(seed, salt, epoch, index):
    """The generator that drives everything random about one item."""
    entropy = [int(seed) % 2 ** 64, int(salt) % 2 ** 64, int(epoch) % 2 ** 64, int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def worker_init_fn(worker_id):
    """DataLoader ``worker_init_fn``: seed the global RNGs from the worker's torch seed.

    The datasets here do not use global RNGs (see the module docstring); this only keeps
    any other code running in a worker reproducible, and stops OpenCV from spawning
    threads inside each worker process.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(0)


class _SeededDataset(Dataset):
    seed = 0
    epoch = 0
    salt = None

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def item_rng(self, idx):
        salt = self.salt if self.salt is not None else zlib.crc32(type(self).__name__.encode())
        return sample_rng(self.seed, salt, self.epoch, idx)


# ----------------------------------------------------------------------------------------
# reading files


def read_image(path):
    """``(H, W, 3)`` float32 RGB in [0, 255], EXIF orientation ignored (masks carry none;
    see :func:`utils.image.read_image`)."""
    return read_rgb(path, apply_exif=False).astype(np.float32)


def read_mask(path, mode='index'):
    """``(H, W)`` uint8 object ids from a PNG mask.

    ``mode``:
      - 'index': pixel values are object ids (DAVIS-2017 / YouTube-VOS palette PNGs);
      - 'binary': every non-zero pixel is object 1 (DAVIS-2016 masks, 0/255);
      - 'auto': palette PNGs as 'index'; grayscale masks whose values reach 128 or more
        (0/255 saliency masks, possibly anti-aliased) as ``value > 127`` -> 1; other
        grayscale masks as 'index'.
    """
    if mode not in ('index', 'binary', 'auto'):
        raise ValueError(f"unknown mask mode {mode!r} (expected 'index', 'binary' or 'auto')")
    pil_mode, arr = load_mask_array(path)
    if arr.ndim == 3:
        if pil_mode in ('LA', 'PA') or (arr[..., :3] == arr[..., :1]).all():
            arr = arr[..., 0]
        else:
            raise ValueError(f'{path}: {pil_mode} colour mask; masks must be palette (P) or '
                             f'grayscale (L) PNGs whose pixel values are object ids')
    if mode == 'binary':
        return (arr > 0).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if mode == 'auto' and pil_mode != 'P' and arr.size and arr.max() >= 128:
        return (arr > 127).astype(np.uint8)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f'{path}: object ids must lie in 0..255, found up to {arr.max()}')
    return arr.astype(np.uint8)


def _check_same_size(image_path, image_hw, mask_path, mask_hw):
    if tuple(image_hw) != tuple(mask_hw):
        raise ValueError(f'{mask_path}: mask is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image '
                         f'{image_path} is {image_hw[1]}x{image_hw[0]}')


def _index_files(folder, exts):
    """``{relative path without extension: path}`` of the files under ``folder``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if name.startswith('.') or ext.lower() not in exts:
                continue
            path = os.path.join(dirpath, name)
            key = os.path.relpath(os.path.join(dirpath, stem), folder)
            if key in found:
                raise ValueError(f'{path}: two files share the stem {key!r} (the other is '
                                 f'{found[key]}); cannot tell which to pair with the mask')
            found[key] = path
    return found


def _pair_by_key(images, masks, where, mask_hint):
    missing = sorted(set(images) - set(masks))
    if missing:
        raise ValueError(f'{images[missing[0]]}: image has no mask ({mask_hint(missing[0])} '
                         f'not found); {len(missing)} image(s) without a mask in {where}')
    extra = sorted(set(masks) - set(images))
    if extra:
        raise ValueError(f'{masks[extra[0]]}: mask has no image with the same stem; '
                         f'{len(extra)} mask(s) without an image in {where}')
    return [(images[k], masks[k]) for k in sorted(images)]


def find_image_mask_pairs(root, image_dir=None, mask_dir=None):
    """All ``(image_path, mask_path)`` pairs under ``root``, paired by relative stem.

    Two layouts:
    - ``root/<image_dir>/**/<stem>.<jpg|png|...>`` with ``root/<mask_dir>/**/<stem>.png``
      at the same relative path. Without ``image_dir``/``mask_dir`` the first of
      :data:`STATIC_LAYOUTS` found under ``root`` is used: upstream's ``JPEGImages`` +
      ``Annotations`` (DAVIS's ``480p`` trees are the same shape), then ``images`` + ``masks``
      (COCO-style exports);
    - otherwise a flat or nested folder where each ``<stem>.jpg`` (or another non-PNG
      image type) has its mask ``<stem>.png`` beside it.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root}: static image dataset folder does not exist')
    if image_dir is None and mask_dir is None:
        image_dir, mask_dir = next(
            ((i, m) for i, m in STATIC_LAYOUTS
             if os.path.isdir(os.path.join(root, i)) or os.path.isdir(os.path.join(root, m))),
            STATIC_LAYOUTS[0])
    elif image_dir is None or mask_dir is None:
        raise ValueError('give both image_dir and mask_dir, or neither')
    img_root, mask_root = os.path.join(root, image_dir), os.path.join(root, mask_dir)
    if os.path.isdir(img_root) or os.path.isdir(mask_root):
        for folder in (img_root, mask_root):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f'{folder}: folder missing (both {image_dir}/ and '
                                        f'{mask_dir}/ are needed under {root})')
        images = _index_files(img_root, IMAGE_EXTS)
        masks = _index_files(mask_root, (MASK_EXT,))
        pairs = _pair_by_key(images, masks, root,
                             lambda k: os.path.join(mask_root, k + MASK_EXT))
    else:
        image_exts = tuple(e for e in IMAGE_EXTS if e != MASK_EXT)
        images = _index_files(root, image_exts)
        masks = _index_files(root, (MASK_EXT,))
        pairs = _pair_by_key(images, masks, root, lambda k: os.path.join(root, k + MASK_EXT))
    if not pairs:
        raise ValueError(f'{root}: no image+mask pairs found (expected {image_dir}/ and '
                         f'{mask_dir}/ trees, or <stem>.jpg files each beside a <stem>.png mask)')
    return pairs


# ----------------------------------------------------------------------------------------
# merging two clips


def _merge_sample(sample1, sample2, min_obj_pixels=100, max_obj_n=10, rng=None):
    """Paste ``sample2``'s objects over ``sample1``, frame by frame.

    Merged ids: ``sample1``'s id where ``sample2`` is background, else ``sample2``'s id
    plus ``max_obj_n``. Ids with more than ``min_obj_pixels`` pixels in the reference frame
    are kept (at most ``max_obj_n``, a random subset if more) and renumbered ``1..k`` in
    id order (in random order for a subset); every other id becomes background in every
    frame. ``VOID_ID`` pixels of ``sample2`` are pasted (image and void label) like its
    objects, and ``sample1``'s void stays void where ``sample2`` is background.
    ``meta`` comes from ``sample1`` with ``obj_num = k``.

    Both samples must be tensors of the same size with ids in ``0..max_obj_n`` or ``VOID_ID``.
    """
    # numpy views of the tensors: per-pixel selects on small maps are faster than torch's
    # thread pool in the main process.
    images1, images2 = ([np.asarray(x) for x in all_images(s)] for s in (sample1, sample2))
    labels1, labels2 = ([np.asarray(x) for x in all_labels(s)] for s in (sample1, sample2))
    if len(images1) != len(images2) or images1[0].shape != images2[0].shape:
        raise ValueError(f"cannot merge clips of different shapes: "
                         f"{sample1['meta'].get('seq_name')!r} has {len(images1)} x "
                         f"{images1[0].shape}, {sample2['meta'].get('seq_name')!r} "
                         f"has {len(images2)} x {images2[0].shape}")
    top = max(int(np.where(x == VOID_ID, 0, x).max()) for x in labels1 + labels2)
    if top > max_obj_n:
        raise ValueError(f'cannot merge clips with object id {top} > max_obj_n={max_obj_n}')
    void = 2 * max_obj_n + 1  # a slot of its own in the merged id space

    def merged_ids(l1, l2):
        l1 = np.where(l1 == VOID_ID, void, l1)
        return np.where(l2 == VOID_ID, void, np.where(l2 > 0, l2 + max_obj_n, l1))

    counts = np.bincount(merged_ids(labels1[0], labels2[0]).ravel(),
                         minlength=2 * max_obj_n + 2)
    kept = [i for i in range(1, 2 * max_obj_n + 1) if counts[i] > min_obj_pixels]
    if len(kept) > max_obj_n:
        rng = rng if rng is not None else np.random.default_rng()
        kept = [kept[i] for i in rng.permutation(len(kept))[:max_obj_n]]
    lut = np.zeros(2 * max_obj_n + 2, np.int64)
    lut[kept] = np.arange(1, len(kept) + 1)
    lut[void] = VOID_ID

    out_images, out_labels = [], []
    for i1, i2, l1, l2 in zip(images1, images2, labels1, labels2):
        out_images.append(torch.from_numpy(np.where(l2 > 0, i2, i1)))
        out_labels.append(torch.from_numpy(lut[merged_ids(l1, l2)]))
    meta = dict(sample1['meta'])
    meta['obj_num'] = len(kept)
    return {'ref_img': out_images[0], 'prev_img': out_images[1], 'curr_img': out_images[2:],
            'ref_label': out_labels[0], 'prev_label': out_labels[1],
            'curr_label': out_labels[2:], 'meta': meta}


def _other_index(rng, n, idx):
    """A random index in ``range(n)`` other than ``idx`` (``idx`` itself if ``n == 1``)."""
    if n <= 1:
        return idx
    j = int(rng.integers(n - 1))
    return j + 1 if j >= idx else j


# ----------------------------------------------------------------------------------------
# static images -> synthetic clips


class StaticTrain(_SeededDataset):
    """Synthetic clips from single image + mask pairs.

    Frame 0 is the (randomly flipped) image; each later frame is flipped (p=0.3),
    colour-jittered and warped by a random affine transform. Every frame is then cropped
    and resized by ``RandomResizedCrop`` (area 0.8-1) to ``output_size``; 'v2' adds random
    grayscale (p=0.2) and blur (p=0.3). Up to ``max_obj_n`` objects of frame 0 (a random
    subset if more) are renumbered ``1..k`` in every frame. With ``dynamic_merge``, a clip
    without objects, or any clip with probability ``merge_prob``, is merged with the clip
    of another random image (``_merge_sample``).

    Args:
        root: folder of pairs, see :func:`find_image_mask_pairs`.
        output_size: ``(H, W)`` or int (``cfg.DATA_RANDOMCROP``).
        mask_mode: how mask values map to ids, see :func:`read_mask` ('auto' reads 0/255
            masks, e.g. DAVIS-2016 or saliency data, as object 1).
    """

    # Images whose short edge exceeds this many times the output size are shrunk first.
    PRESHRINK_MARGIN = 1.5

    def __init__(self, root, output_size=(465, 465), seq_len=5, max_obj_n=10, dynamic_merge=True,
                 merge_prob=1.0, aug_type='v1', seed=0, image_dir=None, mask_dir=None,
                 mask_mode='auto'):
        self.root = root
        self.output_size = (output_size, output_size) if isinstance(output_size, int) \
            else tuple(output_size)
        self.seq_len = seq_len
        self.max_obj_n = max_obj_n
        self.dynamic_merge = dynamic_merge
        self.merge_prob = merge_prob
        self.seed = seed
        self.mask_mode = mask_mode
        self.pairs = find_image_mask_pairs(root, image_dir, mask_dir)
        logger.info('StaticTrain: %d image+mask pairs under %s', len(self.pairs), root)

        self.first_flip = IT.RandomHorizontalFlip(0.5)
        self.flip = IT.RandomHorizontalFlip(0.3)
        self.affine = IT.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                      shear=10, fill=IT.IMAGE_FILL)
        self.crop = IT.RandomResizedCrop.for_output(self.output_size, scale=(0.8, 1.0))
        if aug_type == 'v1':
            self.jitter = IT.ColorJitter(0.1, 0.1, 0.1, 0.03)
            self.gray = self.blur = None
        elif aug_type == 'v2':
            self.jitter = IT.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
            self.gray = IT.RandomGrayscale(0.2)
            self.blur = IT.GaussianBlur((0.1, 2.0), p=0.3)
        else:
            raise ValueError(f"unknown aug_type {aug_type!r} (expected 'v1' or 'v2')")

    def __len__(self):
        return len(self.pairs)

    def load_pair(self, i):
        """RGB image and ``'L'`` mask of object ids, as PIL images."""
        image_path, mask_path = self.pairs[i]
        try:
            with Image.open(image_path) as im:
                img = im.convert('RGB')
        except FileNotFoundError:
            raise FileNotFoundError(f'{image_path}: image file not found') from None
        except (OSError, ValueError) as err:
            raise ValueError(f'{image_path}: cannot read image ({err})') from None
        mask = read_mask(mask_path, self.mask_mode)
        _check_same_size(image_path, img.size[::-1], mask_path, mask.shape)
        mask = Image.fromarray(mask, 'L')
        # Warping a 640x480 photo to make a 161x161 crop wastes most of the loader's time:
        # shrink images far larger than the output first (never for upstream's 465 crops of
        # COCO-sized images, whose short edge stays below the limit).
        limit = int(round(self.PRESHRINK_MARGIN * max(self.output_size)))
        short = min(img.size)
        if short > limit:
            size = (max(1, round(img.size[0] * limit / short)),
                    max(1, round(img.size[1] * limit / short)))
            img, mask = img.resize(size, Image.BICUBIC), mask.resize(size, Image.NEAREST)
        return img, mask

    def sample_sequence(self, idx, rng):
        base_img, base_mask = self.first_flip(*self.load_pair(idx), rng)
        images, labels, lut = [], [], None
        for i in range(self.seq_len):
            img, mask = base_img, base_mask
            if i > 0:
                img, mask = self.flip(img, mask, rng)
                img = self.jitter(img, rng)
                img, mask = self.affine(img, mask, rng)
            img, mask = self.crop(img, mask, rng)
            if self.gray is not None:
                img = self.blur(self.gray(img, rng), rng)
            mask = np.asarray(mask, np.uint8)
            if lut is None:
                # Objects are those of the reference frame; later frames only reuse them.
                # VOID_ID (crowd) is never an object; it stays VOID_ID so the loss ignores it.
                counts = np.bincount(mask.ravel(), minlength=256)
                counts[VOID_ID] = 0
                present = np.flatnonzero(counts[1:]) + 1
                objs = rng.permutation(present)[:self.max_obj_n]
                lut = np.zeros(256, np.uint8)
                lut[objs] = np.arange(1, len(objs) + 1)
                lut[VOID_ID] = VOID_ID
            images.append(image_to_tensor(np.asarray(img, np.float32)))
            labels.append(label_to_tensor(lut[mask]))
        return {'ref_img': images[0], 'prev_img': images[1], 'curr_img': images[2:],
                'ref_label': labels[0], 'prev_label': labels[1], 'curr_label': labels[2:],
                'meta': {'seq_name': self.pairs[idx][0], 'frame_num': 1,
                         'obj_num': int(lut[:VOID_ID].max())}}

    def __getitem__(self, idx):
        rng = self.item_rng(idx)
        sample = self.sample_sequence(idx, rng)
        if self.dynamic_merge and (sample['meta']['obj_num'] == 0
                                   or rng.random() < self.merge_prob):
            other = self.sample_sequence(_other_index(rng, len(self), idx), rng)
            sample = _merge_sample(sample, other, max_obj_n=self.max_obj_n, rng=rng)
        return sample


# ----------------------------------------------------------------------------------------
# videos


def _reflect(index, length):
    """Reflect ``index`` into ``[0, length)`` (..., 2, 1, 0, 1, 2, ..., L-1, L-2, ...)."""
    if length <= 1:
        return 0
    period = 2 * (length - 1)
    index = abs(index) % period
    return period - index if index >= length else index


class VOSTrain(_SeededDataset):
    """Clips of ``seq_len`` frames sampled from annotated videos.

    For item ``idx`` (video ``idx % #videos``): the frame order is reversed with p=0.5;
    a reference frame with more than 200 foreground pixels is looked for (20 tries);
    ``seq_len - 1`` further frames follow it with random steps in ``1..rand_gap``
    (reflected at the ends); the first is ``prev``, the rest ``curr``. This is retried
    (up to 5 times) until every object of those frames appears in the reference.
    ``transform(sample, rng)`` (see ``video_transforms``) then crops, renumbers and
    tensorises; with ``dynamic_merge`` a clip without objects, or any with probability
    ``merge_prob``, is merged with a clip of another video.

    ``label_free=True`` (distillation) reads one mask per video and nothing else: the
    reference is always the video's first frame (the one annotation a semi-supervised user
    has), the other frames follow it from a random start with random steps (in reverse
    order with p=0.5 when ``rand_reverse``), their labels are all ``VOID_ID``, no clip is
    rejected and no clip is merged (merging would paste another video's per-frame masks).

    Args:
        image_root, label_root: folders holding one sub-folder per video.
        imglistdic: ``{video: (image file names, label file names)}``, paired by position
            (the subclasses build them by stem).
        mask_mode: see :func:`read_mask`.
    """

    def __init__(self, image_root, label_root, imglistdic, transform=None, rgb=True,
                 repeat_time=1, rand_gap=3, seq_len=5, rand_reverse=True, dynamic_merge=True,
                 enable_prev_frame=False, merge_prob=0.3, max_obj_n=10, mask_mode='index',
                 seed=0, label_free=False):
        self.label_free = bool(label_free)
        self.image_root = image_root
        self.label_root = label_root
        self.imglistdic = imglistdic
        self.seqs = list(imglistdic)
        self.transform = transform if transform is not None else ToTensor()
        self.rgb = rgb
        self.repeat_time = repeat_time
        self.rand_gap = rand_gap
        self.seq_len = seq_len
        self.rand_reverse = rand_reverse
        self.dynamic_merge = dynamic_merge
        self.enable_prev_frame = enable_prev_frame
        self.merge_prob = merge_prob
        self.max_obj_n = max_obj_n
        self.mask_mode = mask_mode
        self.seed = seed
        if not self.seqs:
            raise ValueError(f'{label_root}: no training videos found')
        logger.info('%s: %d videos x %d', type(self).__name__, len(self.seqs), repeat_time)

    def __len__(self):
        return int(len(self.seqs) * self.repeat_time)

    def _paths(self, seq, images, labels, i):
        return (os.path.join(self.image_root, seq, images[i]),
                os.path.join(self.label_root, seq, labels[i]))

    def load_label(self, seq, images, labels, i):
        return read_mask(self._paths(seq, images, labels, i)[1], self.mask_mode)

    def load_image(self, seq, images, labels, i, label):
        image_path, label_path = self._paths(seq, images, labels, i)
        image = read_image(image_path)
        if not self.rgb:
            image = np.ascontiguousarray(image[:, :, ::-1])
        _check_same_size(image_path, image.shape[:2], label_path, label.shape)
        return image

    def get_ref_index(self, seq, images, labels, rng, min_fg_pixels=200, max_try=20):
        """A random frame with more than ``min_fg_pixels`` foreground pixels, and its label.

        After ``max_try`` draws without one, the last drawn frame is used.
        """
        n = len(labels)
        if n <= 1:
            return 0, self.load_label(seq, images, labels, 0)
        tried, index = {}, 0
        for _ in range(max_try):
            index = int(rng.integers(n))
            if index in tried:
                continue
            tried[index] = self.load_label(seq, images, labels, index)
            if np.count_nonzero(tried[index]) > min_fg_pixels:
                break
        return index, tried[index]

    def _gaps(self, rng, n):
        return [int(rng.integers(self.rand_gap)) + 1 for _ in range(n)]

    def sample_label_free(self, idx, rng):
        """One raw clip that reads only the first frame's mask (see the class docstring)."""
        seq = self.seqs[idx % len(self.seqs)]
        images, labels = self.imglistdic[seq]
        n = len(images)
        ref_label = self.load_label(seq, images, labels, 0)
        ref_image = self.load_image(seq, images, labels, 0, ref_label)
        start = 1 + int(rng.integers(n - 1)) if n > 1 else 0
        steps = np.cumsum([0] + self._gaps(rng, self.seq_len - 2))
        frames = [_reflect(start + int(g), n) for g in steps]
        if self.rand_reverse and rng.integers(2) == 1:
            frames = [_reflect(start - int(g), n) for g in steps]
        frame_images = []
        for i in frames:
            image = read_image(self._paths(seq, images, labels, i)[0])
            if not self.rgb:
                image = np.ascontiguousarray(image[:, :, ::-1])
            if image.shape[:2] != ref_image.shape[:2]:
                raise ValueError(f'{self._paths(seq, images, labels, i)[0]}: frame is '
                                 f'{image.shape[1]}x{image.shape[0]} (WxH) but the first frame '
                                 f'of {seq} is {ref_image.shape[1]}x{ref_image.shape[0]}')
            frame_images.append(image)
        unknown = np.full(ref_label.shape, VOID_ID, np.uint8)
        sample = {'ref_img': ref_image, 'prev_img': frame_images[0],
                  'curr_img': frame_images[1:], 'ref_label': ref_label,
                  'prev_label': unknown, 'curr_label': [unknown] * (len(frames) - 1),
                  'meta': {'seq_name': seq, 'frame_num': n,
                           'obj_num': int(np.where(ref_label == VOID_ID, 0, ref_label).max())}}
        return self.transform(sample, rng)

    def sample_sequence(self, idx, rng):
        """One raw clip (float32 images, uint8 labels) passed through ``transform``."""
        if self.label_free:
            return self.sample_label_free(idx, rng)
        seq = self.seqs[idx % len(self.seqs)]
        images, labels = self.imglistdic[seq]
        n = len(images)
        if self.rand_reverse and rng.integers(2) == 1:
            images, labels = images[::-1], labels[::-1]

        for _ in range(5):
            gaps = self._gaps(rng, self.seq_len - 1)
            if self.enable_prev_frame:
                # prev anywhere; the reference outside (prev, last current frame].
                span = n - sum(gaps)
                prev = int(rng.integers(span)) if span > 1 else 0
                curr = [_reflect(prev + g, n) for g in np.cumsum(gaps)]
                frames = [prev] + curr
                ref, ref_label = self.get_ref_index(seq, images, labels, rng)
                for _ in range(5):
                    if not prev < ref <= max(curr):
                        break
                    ref, ref_label = self.get_ref_index(seq, images, labels, rng)
            else:
                ref, ref_label = self.get_ref_index(seq, images, labels, rng)
                frames = [_reflect(ref + g, n) for g in np.cumsum(gaps)]
            frame_labels = [self.load_label(seq, images, labels, i) for i in frames]
            ref_objs = set(np.unique(ref_label).tolist())
            objs = set().union(*(np.unique(x).tolist() for x in frame_labels))
            if objs - {0} <= ref_objs:
                break

        frame_images = [self.load_image(seq, images, labels, i, lab)
                        for i, lab in zip(frames, frame_labels)]
        ref_image = self.load_image(seq, images, labels, ref, ref_label)
        sample = {'ref_img': ref_image, 'prev_img': frame_images[0],
                  'curr_img': frame_images[1:], 'ref_label': ref_label,
                  'prev_label': frame_labels[0], 'curr_label': frame_labels[1:],
                  'meta': {'seq_name': seq, 'frame_num': n, 'obj_num': int(ref_label.max())}}
        return self.transform(sample, rng)

    def __getitem__(self, idx):
        rng = self.item_rng(idx)
        sample = self.sample_sequence(idx, rng)
        if self.label_free:
            return sample
        if self.dynamic_merge and (sample['meta']['obj_num'] == 0
                                   or rng.random() < self.merge_prob):
            other = self.sample_sequence(_other_index(rng, len(self.seqs), idx % len(self.seqs)),
                                         rng)
            sample = _merge_sample(sample, other, max_obj_n=self.max_obj_n, rng=rng)
        return sample


def _list_frames(image_dir, label_dir):
    """``{stem: image file name}`` and ``{stem: label file name}`` of one video."""
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{folder}: video folder not found')
    images, labels = {}, {}
    for table, folder, exts in ((images, image_dir, IMAGE_EXTS), (labels, label_dir, (MASK_EXT,))):
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            if name.startswith('.') or ext.lower() not in exts:
                continue
            if stem in table:
                raise ValueError(f'{os.path.join(folder, name)}: two files share the stem '
                                 f'{stem!r} (the other is {table[stem]})')
            table[stem] = name
    return images, labels


def read_split_file(path):
    """Video names listed in a split file, in order, without repeats.

    Lines are either names (DAVIS-2017 ``ImageSets/2017/train.txt``) or frame path pairs
    such as ``/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png``
    (DAVIS-2016 ``ImageSets/480p/train.txt``), whose video is the folder of the image.
    """
    names = []
    with open(path) as f:
        for line in f:
            token = line.split()[0] if line.split() else ''
            parts = [p for p in token.replace('\\', '/').split('/') if p]
            if not parts:
                continue
            name = parts[-2] if len(parts) >= 2 else parts[0]
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f'{path}: split file lists no videos')
    return names


class DAVIS2017_Train(VOSTrain):
    """DAVIS training videos: ``root/JPEGImages/480p/<seq>/*.jpg`` and
    ``root/Annotations/480p/<seq>/*.png``, every frame annotated.

    ``year=2017`` reads palette masks of object ids. ``year=2016`` reads single-object
    masks: the DAVIS-2016 package stores the object as 255 (object 1 here, not void), and
    in the DAVIS-2017 package every object of a 2016 video becomes object 1.

    Args:
        split: split names or split file paths. A name is looked up as
            ``root/ImageSets/<year>/<name>.txt``, then ``root/ImageSets/<resolution>/<name>.txt``
            (the DAVIS-2016 package).
        seq_names: explicit video names; overrides ``split``.
        full_resolution: use ``Full-Resolution`` folders when present.
    """

    def __init__(self, split=('train',), root='./DAVIS', transform=None, rgb=True, repeat_time=5,
                 full_resolution=False, year=2017, rand_gap=12, seq_len=5, rand_reverse=True,
                 dynamic_merge=True, enable_prev_frame=False, max_obj_n=10, merge_prob=0.3,
                 seq_names=None, mask_mode=None, seed=0, label_free=False):
        resolution = '480p'
        if full_resolution and os.path.isdir(os.path.join(root, 'JPEGImages', 'Full-Resolution')):
            resolution = 'Full-Resolution'
        elif full_resolution:
            logger.warning('%s has no Full-Resolution frames; using 480p', root)
        image_root = os.path.join(root, 'JPEGImages', resolution)
        label_root = os.path.join(root, 'Annotations', resolution)
        for folder in (image_root, label_root):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f'{folder}: DAVIS folder not found (root={root})')

        if seq_names is None:
            seq_names = []
            for entry in ([split] if isinstance(split, str) else split):
                for name in self._split_names(root, entry, year, resolution):
                    if name not in seq_names:
                        seq_names.append(name)
        if not seq_names:
            raise ValueError(f'{root}: no DAVIS videos selected (split={split!r})')

        imglistdic = {}
        for seq in seq_names:
            img_dir, lab_dir = os.path.join(image_root, seq), os.path.join(label_root, seq)
            imgs, labs = _list_frames(img_dir, lab_dir)
            if label_free and imgs:
                # Only the first frame's mask is ever read; the others may be missing.
                first = sorted(imgs)[0]
                if first not in labs:
                    raise FileNotFoundError(f'{os.path.join(lab_dir, first + MASK_EXT)}: mask of '
                                            f'the first frame of {seq} not found')
                labs = {k: labs.get(k, k + MASK_EXT) for k in imgs}
            pairs = _pair_by_key({k: os.path.join(img_dir, v) for k, v in imgs.items()},
                                 {k: os.path.join(lab_dir, v) for k, v in labs.items()},
                                 f'video {seq}', lambda k: os.path.join(lab_dir, k + MASK_EXT))
            if not pairs:
                raise ValueError(f'{img_dir}: video has no frames')
            imglistdic[seq] = ([os.path.basename(p[0]) for p in pairs],
                               [os.path.basename(p[1]) for p in pairs])
        if mask_mode is None:
            mask_mode = 'binary' if int(year) == 2016 else 'index'
        super().__init__(image_root, label_root, imglistdic, transform, rgb, repeat_time,
                         rand_gap, seq_len, rand_reverse, dynamic_merge, enable_prev_frame,
                         merge_prob=merge_prob, max_obj_n=max_obj_n, mask_mode=mask_mode,
                         seed=seed, label_free=label_free)

    @staticmethod
    def _split_names(root, entry, year, resolution):
        if os.path.isfile(entry):
            return read_split_file(entry)
        candidates = [os.path.join(root, 'ImageSets', str(year), entry + '.txt'),
                      os.path.join(root, 'ImageSets', resolution, entry + '.txt')]
        for path in candidates:
            if os.path.isfile(path):
                return read_split_file(path)
        raise FileNotFoundError(f'DAVIS split {entry!r} not found: tried '
                                f'{" and ".join(candidates)}')


class YOUTUBEVOS_Train(VOSTrain):
    """YouTube-VOS train set: ``root/<year>/train/{JPEGImages,Annotations,meta.json}``
    (or ``root/train/...``).

    A video's frames are the union of the frames listed in ``meta.json`` for its objects
    that appear in at least 2 frames; videos with fewer than 2 such frames are skipped.
    """

    def __init__(self, root='./datasets/YTB', year=2019, transform=None, rgb=True, rand_gap=3,
                 seq_len=5, rand_reverse=True, dynamic_merge=True, enable_prev_frame=False,
                 max_obj_n=10, merge_prob=0.3, repeat_time=1, seed=0, label_free=False):
        candidates = [os.path.join(root, str(year), 'train'), os.path.join(root, 'train')]
        base = next((c for c in candidates if os.path.isdir(c)), None)
        if base is None:
            raise FileNotFoundError(f'YouTube-VOS train folder not found: tried '
                                    f'{" and ".join(candidates)}')
        image_root = os.path.join(base, 'JPEGImages')
        label_root = os.path.join(base, 'Annotations')
        meta_path = os.path.join(base, 'meta.json')
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f'{meta_path}: YouTube-VOS meta file not found')
        try:
            with open(meta_path) as f:
                videos = json.load(f)['videos']
        except (ValueError, KeyError) as err:
            raise ValueError(f'{meta_path}: not a YouTube-VOS meta.json ({err!r})') from None

        imglistdic = {}
        for seq, info in videos.items():
            stems = set()
            for obj in info.get('objects', {}).values():
                if len(obj['frames']) >= 2:
                    stems.update(obj['frames'])
            if len(stems) < 2:
                logger.debug('YouTube-VOS: skipping short video %s', seq)
                continue
            img_dir, lab_dir = os.path.join(image_root, seq), os.path.join(label_root, seq)
            imgs, labs = _list_frames(img_dir, lab_dir)
            stems = sorted(stems)
            for stem in stems:
                if stem not in imgs:
                    raise FileNotFoundError(f'{os.path.join(img_dir, stem + ".jpg")}: frame '
                                            f'listed in {meta_path} not found')
                if stem not in labs:
                    raise FileNotFoundError(f'{os.path.join(lab_dir, stem + MASK_EXT)}: mask '
                                            f'of {os.path.join(img_dir, imgs[stem])} not found')
            imglistdic[seq] = ([imgs[s] for s in stems], [labs[s] for s in stems])
        if not imglistdic:
            raise ValueError(f'{meta_path}: no video with at least 2 annotated frames')
        super().__init__(image_root, label_root, imglistdic, transform, rgb, repeat_time,
                         rand_gap, seq_len, rand_reverse, dynamic_merge, enable_prev_frame,
                         merge_prob=merge_prob, max_obj_n=max_obj_n, mask_mode='index',
                         seed=seed, label_free=label_free)


# ----------------------------------------------------------------------------------------
# config -> dataset


class TrainDataset(ConcatDataset):
    """``ConcatDataset`` of training datasets that forwards ``set_epoch``.

    ``enable_prev_frame`` tells the trainer whether clips carry a separate prev frame.
    """

    def __init__(self, datasets, enable_prev_frame=False):
        super().__init__(datasets)
        self.enable_prev_frame = enable_prev_frame

    def set_epoch(self, epoch):
        for d in self.datasets:
            d.set_epoch(epoch)


TRAIN_DATASETS = ('static', 'davis2017', 'davis2016', 'youtubevos')


def _training_files(dataset):
    """``[(image path or None, mask path or None)]`` a training set will read (every pair a
    clip can draw; a label-free video's first mask only)."""
    if isinstance(dataset, ConcatDataset):
        return [pair for part in dataset.datasets for pair in _training_files(part)]
    if isinstance(dataset, StaticTrain):
        return list(dataset.pairs)
    if isinstance(dataset, VOSTrain):
        pairs = []
        for seq in dataset.seqs:
            images, labels = dataset.imglistdic[seq]
            for i, name in enumerate(images):
                label = None
                if i < len(labels) and (i == 0 or not dataset.label_free):
                    label = dataset._paths(seq, images, labels, i)[1]
                pairs.append((os.path.join(dataset.image_root, seq, name), label))
        return pairs
    return []


def validate_train_files(dataset, progress=True):
    """Check every file a training set will read, before training starts.

    Images: header only (exists, is an image, its size); masks: fully decoded (a truncated
    PNG fails only when its pixels are read) and of their image's size. Raises ``ValueError``
    naming the first bad file; datasets of other types (given by the caller) are not checked.
    Returns the number of files checked.
    """
    from tqdm import tqdm
    pairs = _training_files(dataset)
    checked = 0
    for image_path, mask_path in tqdm(pairs, desc='checking the training data', unit='file',
                                      disable=not progress, dynamic_ncols=True):
        size = None
        if image_path is not None:
            try:
                with Image.open(image_path) as img:
                    size = img.size
            except FileNotFoundError:
                raise ValueError(f'{image_path}: image file not found') from None
            except Exception as err:
                raise ValueError(f'{image_path}: cannot read image ({type(err).__name__}: '
                                 f'{err})') from None
            checked += 1
        if mask_path is not None:
            try:
                with Image.open(mask_path) as img:
                    img.load()
                    mask_size = img.size
            except FileNotFoundError:
                raise ValueError(f'{mask_path}: mask file not found') from None
            except Exception as err:
                raise ValueError(f'{mask_path}: cannot read mask, truncated or corrupt '
                                 f'({type(err).__name__}: {err})') from None
            if size is not None and mask_size != size:
                raise ValueError(f'{mask_path}: mask is {mask_size[0]}x{mask_size[1]} (WxH) but '
                                 f'its image {image_path} is {size[0]}x{size[1]}')
            checked += 1
    return checked


def build_train_dataset(cfg, seed=0, transform=None):
    """The training set named by ``cfg.DATASETS``, concatenated in that order.

    Roots: ``cfg.DIR_STATIC``, ``cfg.DIR_DAVIS`` (also for 'davis2016' unless
    ``cfg.DIR_DAVIS2016`` is set) and ``cfg.DIR_YTB``. VOS clips use
    ``train_transforms_from_cfg(cfg)`` unless ``transform`` is given; ``cfg.DATA_LABEL_FREE``
    makes video clips read their first frame's mask only (``VOSTrain``). As upstream,
    the separate-prev-frame mode (``cfg.TRAIN_ENABLE_PREV_FRAME``) is off when static
    images are in the mix.
    """
    names = list(cfg.DATASETS)
    if not names:
        raise ValueError('cfg.DATASETS is empty: name at least one of ' + ', '.join(TRAIN_DATASETS))
    unknown = [n for n in names if n not in TRAIN_DATASETS]
    if unknown:
        raise ValueError(f'unknown training dataset(s) {unknown}; '
                         f'known: {", ".join(TRAIN_DATASETS)}')
    enable_prev_frame = bool(cfg.TRAIN_ENABLE_PREV_FRAME) and 'static' not in names
    transform = transform if transform is not None else train_transforms_from_cfg(cfg)
    common = dict(seq_len=cfg.DATA_SEQ_LEN, merge_prob=cfg.DATA_DYNAMIC_MERGE_PROB,
                  max_obj_n=cfg.MODEL_MAX_OBJ_NUM, seed=seed)
    # Label-free stages (distillation) read each video's first mask only; static images
    # have one mask each, which is every clip's reference, so they need no change.
    video = dict(common, transform=transform, rand_reverse=cfg.DATA_RANDOM_REVERSE_SEQ,
                 enable_prev_frame=enable_prev_frame, label_free=cfg.DATA_LABEL_FREE)
    datasets = []
    for k, name in enumerate(names):
        if name == 'static':
            ds = StaticTrain(cfg.DIR_STATIC, cfg.DATA_RANDOMCROP, aug_type=cfg.TRAIN_AUG_TYPE,
                             **common)
        elif name in ('davis2017', 'davis2016'):
            year = int(name[-4:])
            root = getattr(cfg, 'DIR_DAVIS2016', None) if year == 2016 else None
            ds = DAVIS2017_Train(split=getattr(cfg, 'DATA_DAVIS_SPLIT', ('train',)),
                                 root=root or cfg.DIR_DAVIS, year=year,
                                 full_resolution=cfg.TRAIN_DATASET_FULL_RESOLUTION,
                                 repeat_time=cfg.DATA_DAVIS_REPEAT,
                                 rand_gap=cfg.DATA_RANDOM_GAP_DAVIS, **video)
        else:
            ds = YOUTUBEVOS_Train(cfg.DIR_YTB, year=getattr(cfg, 'DATA_YTB_YEAR', 2019),
                                  rand_gap=cfg.DATA_RANDOM_GAP_YTB, **video)
        # Distinct random streams per entry, stable across runs and data locations.
        ds.salt = zlib.crc32(f'{name}:{k}'.encode())
        datasets.append(ds)
    return TrainDataset(datasets, enable_prev_frame)
