"""Test-time transforms: size each frame for the network, add flipped copies, normalise.

These reproduce upstream's ``MultiRestrictSize`` + ``MultiToTensor`` bit for bit, because the
reference numbers (and the published checkpoints' scores) were made with them:

- the size is restricted (short edge, then long edge), scaled, then aligned to the network
  stride: ``16k + 1`` for align-corners models, ``16k`` otherwise, rounding half to even;
- the float32 RGB frame (values 0..255) is resized with OpenCV bicubic, with no clipping of the
  overshoot; the resize is skipped when the size already fits;
- labels keep their original resolution (the evaluator resizes them with nearest);
- normalisation comes after the resize: ``x / 255`` in float32, then the ImageNet mean and std
  are applied in float64 and rounded back to float32 (what numpy does for ``x -= tuple``).

A sample is a dict with ``'current_img'`` ``(H, W, 3)``, optionally ``'current_label'``
``(H, W)`` and ``'meta'``; :class:`MultiRestrictSize` turns it into a list of samples ordered
``[s1, s1-flip, s2, s2-flip, ...]``.
"""
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _align(n, align_corners, stride):
    if align_corners:
        if (n - 1) % stride != 0:
            n = int(np.around((n - 1) / stride) * stride + 1)
    elif n % stride != 0:
        n = int(np.around(n / stride) * stride)
    return n


def restricted_size(height, width, max_short_edge=None, max_long_edge=None, scale=1.0,
                    align_corners=True, max_stride=16):
    """Network input size ``(h, w)`` for a ``height x width`` frame at one test scale.

    Example: 480x854 -> 481x849 (align corners) or 480x848; 720x1280 with
    ``max_long_edge=1040`` -> 577x1041 or 592x1040.
    """
    # The float operations and their order follow upstream so int() truncates identically.
    h, w = float(height), float(width)
    sc = 1.
    if max_short_edge is not None and min(height, width) > max_short_edge:
        sc *= float(max_short_edge) / min(height, width)
    h, w = sc * h, sc * w
    sc = 1.
    if max_long_edge is not None:
        long_edge = h if h > w else w
        if long_edge > max_long_edge:
            sc *= float(max_long_edge) / long_edge
    h, w = sc * h, sc * w
    h, w = int(h * scale), int(w * scale)
    return _align(h, align_corners, max_stride), _align(w, align_corners, max_stride)


class MultiRestrictSize:
    """One sample -> a list of samples, one per test scale (and its flipped copy).

    Args:
        max_short_edge: frames whose short edge is longer are scaled down to it (None: no limit).
        max_long_edge: then frames whose long edge is longer are scaled down to it.
        flip: also emit a horizontally flipped copy of each scale (``meta['flip'] = True``).
        multi_scale: test scales, applied after the edge limits.
        align_corners: the model's ``MODEL_ALIGN_CORNERS`` (16k+1 sizes) or not (16k sizes).
        max_stride: the network stride sizes are aligned to.
    """

    def __init__(self, max_short_edge=None, max_long_edge=800, flip=False, multi_scale=(1.3,),
                 align_corners=True, max_stride=16):
        self.max_short_edge = max_short_edge
        self.max_long_edge = max_long_edge
        self.flip = flip
        self.multi_scale = list(multi_scale)
        self.align_corners = align_corners
        self.max_stride = max_stride

    def __call__(self, sample):
        image = sample['current_img']
        h, w = image.shape[:2]
        samples = []
        for scale in self.multi_scale:
            new_h, new_w = restricted_size(h, w, self.max_short_edge, self.max_long_edge, scale,
                                           self.align_corners, self.max_stride)
            if (new_h, new_w) == (h, w):
                resized = dict(sample)
            else:
                resized = {}
                for key, value in sample.items():
                    if key == 'meta' or 'label' in key or value is None:
                        resized[key] = value
                    else:
                        # Bicubic on float32 values, never on uint8 (which would round and clip).
                        resized[key] = cv2.resize(np.asarray(value, dtype=np.float32),
                                                  dsize=(new_w, new_h),
                                                  interpolation=cv2.INTER_CUBIC)
            samples.append(resized)
            if self.flip:
                flipped = {}
                for key, value in resized.items():
                    if key == 'meta':
                        flipped[key] = dict(value, flip=True)
                    elif value is None:
                        flipped[key] = None
                    else:
                        flipped[key] = np.ascontiguousarray(np.asarray(value)[:, ::-1])
                samples.append(flipped)
        return samples

    def __repr__(self):
        return (f'{type(self).__name__}(max_short_edge={self.max_short_edge}, '
                f'max_long_edge={self.max_long_edge}, flip={self.flip}, '
                f'multi_scale={self.multi_scale}, align_corners={self.align_corners}, '
                f'max_stride={self.max_stride})')


def normalize_image(image):
    """``(H, W, 3)`` RGB 0..255 -> ``(3, H, W)`` float32 tensor, ImageNet-normalised.

    Same rounding as upstream: divide in float32, subtract / divide the statistics in float64,
    round to float32 after each step.
    """
    x = np.asarray(image, dtype=np.float32) / np.float32(255.)
    x = (x - np.asarray(IMAGENET_MEAN, dtype=np.float64)).astype(np.float32)
    x = (x / np.asarray(IMAGENET_STD, dtype=np.float64)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class MultiToTensor:
    """List of samples -> the same list with images ``(3, H, W)`` float32 normalised tensors and
    labels ``(1, H, W)`` int32 tensors; ``meta`` is left as it is."""

    def __call__(self, samples):
        out = []
        for sample in samples:
            converted = {}
            for key, value in sample.items():
                if key == 'meta' or value is None:
                    converted[key] = value
                elif np.ndim(value) == 2:
                    converted[key] = torch.from_numpy(
                        np.ascontiguousarray(value)[None].astype(np.int32))
                else:
                    converted[key] = normalize_image(value)
            out.append(converted)
        return out


class Compose:
    """Apply transforms in order (a stand-in for torchvision's, which we do not depend on)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self):
        return f'{type(self).__name__}({self.transforms})'


def build_eval_transform(cfg):
    """The evaluator's transform from a config's ``TEST_*`` and ``MODEL_ALIGN_CORNERS`` fields."""
    return Compose([
        MultiRestrictSize(cfg.TEST_MAX_SHORT_EDGE, cfg.TEST_MAX_LONG_EDGE, cfg.TEST_FLIP,
                          cfg.TEST_MULTISCALE, cfg.MODEL_ALIGN_CORNERS),
        MultiToTensor(),
    ])
