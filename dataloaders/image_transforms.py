"""Per-image augmentations for synthetic clips, on PIL images (no torchvision).

These re-implement the torchvision transforms upstream's ``StaticTrain`` uses, with the
same parameter distributions, but every random draw comes from an explicit
``numpy.random.Generator`` argument so a sample is a pure function of its seed (no global
RNG, hence the same samples whatever the number of DataLoader workers).

Geometric transforms take ``(img, mask, rng)`` and move both with one set of parameters:
the image is resampled bicubically, the mask with nearest neighbour, and both sample at
pixel centres, so an object's label stays on its pixels. Photometric transforms take
``(img, rng)`` and leave masks alone. Images are RGB ``PIL.Image``; masks are ``'L'``
(or ``'P'``) ``PIL.Image`` holding object ids.
"""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# Upstream's fill for pixels that an affine warp brings in from outside the image:
# roughly the ImageNet mean, so it normalises to about zero.
IMAGE_FILL = (124, 116, 104)


def hflip(img, mask):
    return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)


class RandomHorizontalFlip:
    """Flip image and mask left-right together with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, mask, rng):
        if rng.random() < self.p:
            return hflip(img, mask)
        return img, mask


def inverse_affine_matrix(center, angle, translate, scale, shear):
    """Coefficients ``(a, b, c, d, e, f)`` mapping output to input pixel coordinates.

    The forward map is ``T(translate) * C * R(angle) * S(scale) * Sh(shear) * C^-1`` about
    ``center`` (torchvision's convention: angle and shear in degrees, shear = (x, y)).
    PIL's ``Image.AFFINE`` wants the inverse, as ``x_in = a x + b y + c``,
    ``y_in = d x + e y + f``.
    """
    rot = math.radians(angle)
    sx, sy = (math.radians(s) for s in shear)
    cx, cy = center
    tx, ty = translate
    # Rotation times shear, unscaled; its determinant is 1.
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return tuple(m)


class RandomAffine:
    """Random rotation, translation, scale and x-shear about the image centre.

    Args:
        degrees: rotation drawn from ``U(-degrees, degrees)``.
        translate: ``(fx, fy)``; the shift is ``round(U(-fx W, fx W))`` pixels (same for y).
        scale: ``(lo, hi)`` for ``U(lo, hi)``.
        shear: x-shear drawn from ``U(-shear, shear)`` degrees (no y-shear, as upstream).
        fill: RGB value for pixels coming from outside the image; masks get 0.
    """

    def __init__(self, degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10,
                 fill=IMAGE_FILL):
        self.degrees = (-degrees, degrees)
        self.translate = translate
        self.scale = scale
        self.shear = (-shear, shear)
        self.fill = tuple(fill)

    def get_params(self, rng, size):
        """``size`` is PIL's ``(W, H)``; returns ``(angle, (tx, ty), scale, (shx, shy))``."""
        angle = rng.uniform(*self.degrees)
        max_dx = self.translate[0] * size[0]
        max_dy = self.translate[1] * size[1]
        translate = (float(np.round(rng.uniform(-max_dx, max_dx))),
                     float(np.round(rng.uniform(-max_dy, max_dy))))
        scale = rng.uniform(*self.scale)
        shear = (rng.uniform(*self.shear), 0.0)
        return angle, translate, scale, shear

    def __call__(self, img, mask, rng):
        angle, translate, scale, shear = self.get_params(rng, img.size)
        center = (img.size[0] * 0.5, img.size[1] * 0.5)
        matrix = inverse_affine_matrix(center, angle, translate, scale, shear)
        img = img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=self.fill)
        mask = mask.transform(mask.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=0)
        return img, mask


class ColorJitter:
    """Random brightness, contrast, saturation and hue, applied in a random order.

    Factors are drawn as torchvision does: brightness/contrast/saturation from
    ``U(max(0, 1 - v), 1 + v)``, hue shift from ``U(-hue, hue)`` (fraction of a turn).
    With ``p < 1`` the whole jitter is skipped with probability ``1 - p``
    (upstream's ``RandomApply([ColorJitter], p)``).
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0):
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f'hue must be in [0, 0.5], got {hue}')
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue)
        self.p = p

    def get_params(self, rng):
        order = rng.permutation(4)
        factors = [rng.uniform(max(0.0, 1 - v), 1 + v) if v > 0 else None
                   for v in (self.brightness, self.contrast, self.saturation)]
        factors.append(rng.uniform(-self.hue, self.hue) if self.hue > 0 else None)
        return order, factors

    def __call__(self, img, rng):
        if self.p < 1.0 and not rng.random() < self.p:
            return img
        order, factors = self.get_params(rng)
        for i in order:
            f = factors[i]
            if f is None:
                continue
            if i == 0:
                img = ImageEnhance.Brightness(img).enhance(f)
            elif i == 1:
                img = ImageEnhance.Contrast(img).enhance(f)
            elif i == 2:
                img = ImageEnhance.Color(img).enhance(f)
            else:
                img = adjust_hue(img, f)
        return img


def adjust_hue(img, hue_factor):
    """Rotate the hue of an RGB image by ``hue_factor`` of a turn (in [-0.5, 0.5])."""
    h, s, v = img.convert('HSV').split()
    shift = int(round(hue_factor * 255))
    h = Image.fromarray(((np.asarray(h, np.int16) + shift) % 256).astype(np.uint8), 'L')
    return Image.merge('HSV', (h, s, v)).convert(img.mode)


class RandomGrayscale:
    """Replace the image by its luma, kept 3-channel, with probability ``p``."""

    def __init__(self, p=0.2):
        self.p = p

    def __call__(self, img, rng):
        if rng.random() < self.p:
            return img.convert('L').convert(img.mode)
        return img


class GaussianBlur:
    """PIL Gaussian blur with radius ``U(sigma[0], sigma[1])``, applied with probability ``p``."""

    def __init__(self, sigma=(0.1, 2.0), p=1.0):
        self.sigma = sigma
        self.p = p

    def __call__(self, img, rng):
        if self.p < 1.0 and not rng.random() < self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.sigma)))


class RandomResizedCrop:
    """Crop a random area fraction and aspect ratio, then resize to ``size``.

    Args:
        size: output ``(H, W)`` (or an int for a square).
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ``w / h``. Upstream passes
            ``(3/4, 4/3) * (W / H)`` of the output, see :meth:`for_output`.

    After 10 failed draws it falls back to the largest centred crop within ``ratio``.
    """

    def __init__(self, size, scale=(0.8, 1.0), ratio=(3. / 4., 4. / 3.)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = scale
        self.ratio = ratio

    @classmethod
    def for_output(cls, size, scale=(0.8, 1.0)):
        """Upstream's rule: aspect range (3/4, 4/3) relative to the output's ``W / H``."""
        size = (size, size) if isinstance(size, int) else tuple(size)
        base = float(size[1]) / size[0]
        return cls(size, scale, (base * 3. / 4., base * 4. / 3.))

    def get_params(self, rng, width, height):
        """Returns the crop ``(top, left, h, w)``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = rng.uniform(*self.scale) * area
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, mask, rng):
        top, left, h, w = self.get_params(rng, *img.size)
        box = (left, top, left + w, top + h)
        out_wh = (self.size[1], self.size[0])
        img = img.resize(out_wh, Image.BICUBIC, box=box)
        mask = mask.resize(out_wh, Image.NEAREST, box=box)
        return img, mask
