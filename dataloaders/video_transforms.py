"""Training augmentations for VOS clips (upstream ``dataloaders/video_transforms.py``).

A training sample is a dict (see ``train_datasets``)::

    ref_img, prev_img       (H, W, 3) float32 RGB in [0, 255]
    curr_img                list of those
    ref_label, prev_label   (H, W) uint8 object ids
    curr_label              list of those
    meta                    {'seq_name', 'frame_num', 'obj_num'}

Each transform is called as ``t(sample, rng)`` with a ``numpy.random.Generator`` and
returns the sample. Geometric transforms draw one set of parameters and apply it to every
frame and label of the clip; the photometric v2 transforms draw independently per frame,
as upstream does. Images are resampled bicubically and labels with pixel-centred nearest
neighbour (``INTER_NEAREST_EXACT``; plain ``INTER_NEAREST`` in OpenCV samples half a pixel
off the cubic grid), so labels stay on their pixels.

``build_train_transforms`` assembles upstream's 'v1' (AOT) and 'v2' (DeAOT) sets;
``ToTensor`` ends both with ImageNet normalisation.
"""
import cv2
import numpy as np
import torch
from PIL import Image

from utils.image import VOID_ID  # neither object nor background: ignored by the losses

from . import image_transforms as IT

IMAGE_KEYS = ('ref_img', 'prev_img', 'curr_img')
LABEL_KEYS = ('ref_label', 'prev_label', 'curr_label')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _apply(sample, keys, fn):
    """Replace every array under ``keys`` (a frame or a list of frames) by ``fn(array)``."""
    for key in keys:
        value = sample[key]
        sample[key] = [fn(x) for x in value] if isinstance(value, list) else fn(value)
    return sample


def all_labels(sample):
    return [sample['ref_label'], sample['prev_label']] + list(sample['curr_label'])


def all_images(sample):
    return [sample['ref_img'], sample['prev_img']] + list(sample['curr_img'])


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample, rng):
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self):
        return 'Compose(' + ', '.join(type(t).__name__ for t in self.transforms) + ')'


class RandomScale:
    """Resize the clip by ``U(min_scale, max_scale)``, times ``short_edge / min(H, W)``.

    The short-edge factor is taken from ``prev_img`` so that clips of any resolution land
    around the same size before cropping.
    """

    def __init__(self, min_scale=0.7, max_scale=1.3, short_edge=None):
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.short_edge = short_edge

    def __call__(self, sample, rng):
        sc = rng.uniform(self.min_scale, self.max_scale)
        if self.short_edge is not None:
            sc *= float(self.short_edge) / min(sample['prev_img'].shape[:2])

        def size_of(x):
            h, w = x.shape[:2]
            return max(1, int(round(w * sc))), max(1, int(round(h * sc)))

        _apply(sample, IMAGE_KEYS,
               lambda x: cv2.resize(x, size_of(x), interpolation=cv2.INTER_CUBIC))
        _apply(sample, LABEL_KEYS,
               lambda x: cv2.resize(x, size_of(x), interpolation=cv2.INTER_NEAREST_EXACT))
        return sample


class BalancedRandomCrop:
    """Random crop that keeps at least one object of the reference frame when it can.

    Up to ``max_step`` crops of ``min(output_size, image size)`` are drawn until the
    reference label's crop holds an object of more than ``min_obj_pixel_num`` pixels. The
    objects that pass that test (at most ``max_obj_num``, a random subset if more) are
    renumbered ``1..k`` in every frame; all other ids become background. Sets
    ``meta['obj_num'] = k`` (0 if no crop found an object).
    """

    def __init__(self, output_size, max_step=5, max_obj_num=10, min_obj_pixel_num=100):
        self.output_size = (output_size, output_size) if isinstance(output_size, int) \
            else tuple(output_size)
        self.max_step = max_step
        self.max_obj_num = max_obj_num
        self.min_obj_pixel_num = min_obj_pixel_num

    def __call__(self, sample, rng):
        h, w = sample['prev_img'].shape[:2]
        new_h, new_w = min(self.output_size[0], h), min(self.output_size[1], w)
        ref_label = sample['ref_label']
        kept = []
        for _ in range(self.max_step):
            top = int(rng.integers(0, h - new_h + 1))
            left = int(rng.integers(0, w - new_w + 1))
            counts = np.bincount(ref_label[top:top + new_h, left:left + new_w].ravel())
            kept = [i for i in range(1, min(len(counts), VOID_ID))
                    if counts[i] > self.min_obj_pixel_num]
            if kept:
                break
        if len(kept) > self.max_obj_num:
            kept = list(rng.permutation(kept)[:self.max_obj_num])

        max_id = max(int(x.max()) for x in all_labels(sample))
        lut = np.zeros(max(max_id + 1, 256), np.uint8)
        lut[np.asarray(kept, np.int64)] = np.arange(1, len(kept) + 1, dtype=np.uint8)
        lut[VOID_ID] = VOID_ID  # void / unknown pixels stay ignored, never background

        _apply(sample, IMAGE_KEYS, lambda x: x[top:top + new_h, left:left + new_w])
        _apply(sample, LABEL_KEYS, lambda x: lut[x[top:top + new_h, left:left + new_w]])
        sample['meta']['obj_num'] = len(kept)
        return sample


class RandomHorizontalFlip:
    """Flip the whole clip left-right with probability ``prob`` (one draw per clip)."""

    def __init__(self, prob=0.5):
        self.p = prob

    def __call__(self, sample, rng):
        if rng.random() < self.p:
            flip = lambda x: np.ascontiguousarray(x[:, ::-1])  # noqa: E731
            _apply(sample, IMAGE_KEYS, flip)
            _apply(sample, LABEL_KEYS, flip)
        return sample


class _PerFramePhotometric:
    """Apply a PIL colour op to each frame independently with probability ``prob``.

    Frames go through uint8 (rounded and clipped: bicubic resizing overshoots [0, 255]).
    """

    op = None

    def __init__(self, prob):
        self.p = prob

    def _one(self, x, rng):
        if not rng.random() < self.p:
            return x
        img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
        return np.asarray(self.op(img, rng), dtype=np.float32)

    def __call__(self, sample, rng):
        return _apply(sample, IMAGE_KEYS, lambda x: self._one(x, rng))


class RandomColorJitter(_PerFramePhotometric):
    def __init__(self, prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
        super().__init__(prob)
        self.op = IT.ColorJitter(brightness, contrast, saturation, hue)


class RandomGrayScale(_PerFramePhotometric):
    def __init__(self, prob=0.2):
        super().__init__(prob)
        self.op = IT.RandomGrayscale(p=1.0)


class RandomGaussianBlur(_PerFramePhotometric):
    def __init__(self, prob=0.3, sigma=(0.1, 2.0)):
        super().__init__(prob)
        self.op = IT.GaussianBlur(sigma, p=1.0)


class Resize:
    """Bring every frame to ``output_size`` ``(H, W)``.

    With ``use_padding`` (training), smaller frames are padded, with the padding split
    randomly between the two sides of each axis (images with ``IT.IMAGE_FILL``, labels
    with 0); otherwise frames are rescaled.
    """

    def __init__(self, output_size, use_padding=False):
        self.output_size = (output_size, output_size) if isinstance(output_size, int) \
            else tuple(output_size)
        self.use_padding = use_padding

    def __call__(self, sample, rng):
        new_h, new_w = self.output_size
        h, w = sample['prev_img'].shape[:2]
        if (h, w) == (new_h, new_w):
            return sample
        if not self.use_padding:
            _apply(sample, IMAGE_KEYS, lambda x: cv2.resize(
                x, (new_w, new_h), interpolation=cv2.INTER_CUBIC))
            _apply(sample, LABEL_KEYS, lambda x: cv2.resize(
                x, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT))
            return sample
        if h > new_h or w > new_w:
            raise ValueError(f'Resize(use_padding=True): frame {h}x{w} of '
                             f'{sample["meta"].get("seq_name")!r} is larger than the output '
                             f'{new_h}x{new_w}; crop first')
        top = int(rng.integers(0, new_h - h + 1))
        left = int(rng.integers(0, new_w - w + 1))
        pads = (top, new_h - h - top, left, new_w - w - left)
        _apply(sample, IMAGE_KEYS, lambda x: cv2.copyMakeBorder(
            x, *pads, cv2.BORDER_CONSTANT, value=tuple(float(v) for v in IT.IMAGE_FILL)))
        _apply(sample, LABEL_KEYS, lambda x: cv2.copyMakeBorder(
            x, *pads, cv2.BORDER_CONSTANT, value=0))
        return sample


def image_to_tensor(x):
    """``(H, W, 3)`` RGB in [0, 255] -> ImageNet-normalised ``(3, H, W)`` float32."""
    x = (np.asarray(x, np.float32) / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) \
        / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def label_to_tensor(x):
    """``(H, W)`` ids -> ``(1, H, W)`` int64."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)[None])


class ToTensor:
    def __call__(self, sample, rng=None):
        _apply(sample, IMAGE_KEYS, image_to_tensor)
        _apply(sample, LABEL_KEYS, label_to_tensor)
        return sample


def build_train_transforms(aug_type='v2', crop_size=(465, 465), min_scale=0.7, max_scale=1.3,
                           short_edge=480, flip_prob=0.5, max_obj_num=10, max_crop_steps=5):
    """Upstream's training pipelines for VOS clips.

    'v1' (AOT): scale, balanced crop, flip, pad, to-tensor.
    'v2' (DeAOT): v1 plus per-frame colour jitter (p=0.8), grayscale (p=0.2) and blur
    (p=0.3) after the crop.
    """
    head = [RandomScale(min_scale, max_scale, short_edge),
            BalancedRandomCrop(crop_size, max_step=max_crop_steps, max_obj_num=max_obj_num)]
    tail = [RandomHorizontalFlip(flip_prob), Resize(crop_size, use_padding=True), ToTensor()]
    if aug_type == 'v1':
        return Compose(head + tail)
    if aug_type == 'v2':
        return Compose(head + [RandomColorJitter(), RandomGrayScale(), RandomGaussianBlur()]
                       + tail)
    raise ValueError(f"unknown TRAIN_AUG_TYPE {aug_type!r} (expected 'v1' or 'v2')")


def train_transforms_from_cfg(cfg):
    """``build_train_transforms`` with the DATA_* / TRAIN_AUG_TYPE fields of a config."""
    return build_train_transforms(
        aug_type=cfg.TRAIN_AUG_TYPE, crop_size=cfg.DATA_RANDOMCROP,
        min_scale=cfg.DATA_MIN_SCALE_FACTOR, max_scale=cfg.DATA_MAX_SCALE_FACTOR,
        short_edge=cfg.DATA_SHORT_EDGE_LEN, flip_prob=cfg.DATA_RANDOMFLIP,
        max_obj_num=cfg.MODEL_MAX_OBJ_NUM, max_crop_steps=getattr(cfg, 'DATA_MAX_CROP_STEPS', 5))


# Evaluation transforms live in eval_transforms.py; re-exported for upstream-style imports.
from .eval_transforms import MultiRestrictSize, MultiToTensor  # noqa: E402,F401
