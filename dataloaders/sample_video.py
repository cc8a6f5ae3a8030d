"""The built-in sample video: real photographs in motion, with exact ground truth.

Nothing is downloaded: every picture comes from the photographs bundled with scikit-image (a
dependency), all free of copyright restrictions:

- background: ``skimage.data.rocket()``, the launch of DSCOVR on a Falcon 9 (SpaceX, released
  into the public domain), seen by a camera that pans and slowly zooms;
- object 1: the horse silhouette ``skimage.data.horse()`` (openclipart, CC0 by Andreas
  Preuss) cut out of the photograph ``skimage.data.chelsea()`` (Chelsea the cat, CC0 by
  Stefan van der Walt): a cat-fur horse that gallops left to right, bobbing and growing;
- object 2: the cup and saucer of ``skimage.data.coffee()`` (CC0 by Rachel Michetti), cut out
  along two ellipses, drifting right to left and turning; the horse passes in front of it.

Frames are composited in float, so the masks are the ground truth of every pixel; the clip is
stored as an mp4 (lossy) with the first-frame mask and the masks of all frames, and
:func:`sample_scores` gives its J&F (DAVIS protocol: mean over objects of the per-frame means,
first frame excluded).
"""
import os

import cv2
import numpy as np

SAMPLE_FRAMES = 40
SAMPLE_SIZE = (240, 432)  # (H, W)
SAMPLE_FPS = 15
LICENCE = ('built from scikit-image\'s bundled photographs: rocket (SpaceX, public domain), '
           'chelsea (CC0, Stefan van der Walt), coffee (CC0, Rachel Michetti) and the horse '
           'silhouette (CC0, Andreas Preuss)')


def _photos():
    from skimage import data
    return (data.rocket().astype(np.float32), data.chelsea().astype(np.float32),
            data.coffee().astype(np.float32), data.horse())


def _cup_mask(coffee_hw):
    """The saucer and the cup of ``skimage.data.coffee()`` as two ellipses (read off the
    400x600 photograph)."""
    mask = np.zeros(coffee_hw, np.uint8)
    cv2.ellipse(mask, (278, 230), (200, 156), 0, 0, 360, 1, -1)    # saucer
    cv2.ellipse(mask, (290, 128), (118, 112), 0, 0, 360, 1, -1)    # cup seen from above
    return mask


def _place(sprite, sprite_mask, h, w, centre, scale, angle):
    """Warp a sprite and its mask into an ``(h, w)`` frame: scaled, rotated about its centre
    and moved to ``centre`` (x, y). Returns ``(image, alpha)`` in float32."""
    sh, sw = sprite_mask.shape
    m = cv2.getRotationMatrix2D((sw / 2., sh / 2.), angle, scale)
    m[:, 2] += np.asarray(centre, np.float64) - (sw / 2., sh / 2.)
    img = cv2.warpAffine(sprite, m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.warpAffine(sprite_mask.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT)
    return img, alpha


def render_sample(num_frames=SAMPLE_FRAMES, size=SAMPLE_SIZE):
    """``(frames, labels)``: ``num_frames`` RGB uint8 frames ``(H, W, 3)`` and their id maps
    ``(H, W)`` uint8 (0 background, 1 horse, 2 cup). Deterministic."""
    h, w = size
    rocket, cat, coffee, horse = _photos()
    # The horse cut out of the cat photograph (both resized to one sprite of 164x200).
    horse_mask = cv2.resize(horse.astype(np.uint8), (200, 164), interpolation=cv2.INTER_NEAREST)
    horse_mask = 1 - horse_mask  # the silhouette is black (False) on white
    fur = cv2.resize(cat[40:260, 60:330], (200, 164), interpolation=cv2.INTER_AREA)
    cup_mask = _cup_mask(coffee.shape[:2])
    # The background moves as a camera would: pan right to left and zoom in slightly.
    bh, bw = rocket.shape[:2]
    frames, labels = [], []
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        zoom = 1.0 + 0.15 * t
        crop_w = 0.8 * bw / zoom
        crop_h = crop_w * h / w
        x0 = (bw - crop_w) * (0.9 - 0.6 * t)
        y0 = (bh - crop_h) * 0.7
        m = np.array([[w / crop_w, 0, -x0 * w / crop_w], [0, h / crop_h, -y0 * h / crop_h]])
        frame = cv2.warpAffine(rocket, m, (w, h), flags=cv2.INTER_AREA)
        label = np.zeros((h, w), np.uint8)
        cup_centre = (w * (0.78 - 0.3 * t), h * (0.62 + 0.04 * np.sin(3 * t)))
        cup_img, cup_a = _place(coffee, cup_mask, h, w, cup_centre, 0.24, 40 * t)
        horse_centre = (w * (0.18 + 0.68 * t), h * (0.55 - 0.06 * np.abs(np.sin(9 * t))))
        horse_img, horse_a = _place(fur, horse_mask, h, w, horse_centre, 0.55 + 0.2 * t,
                                    6 * np.sin(7 * t))
        for oid, img, alpha in ((2, cup_img, cup_a), (1, horse_img, horse_a)):  # back to front
            a = alpha[..., None]
            frame = frame * (1 - a) + img * a
            label[alpha >= 0.5] = oid
        frames.append(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
        labels.append(label)
    return frames, labels


def make_sample(folder, num_frames=SAMPLE_FRAMES, size=SAMPLE_SIZE):
    """Write the sample into ``folder``: ``sample.mp4``, ``sample_mask.png`` (frame 0) and
    ``gt/<frame>.png`` (every frame). Returns ``(video_path, first_mask_path, gt_folder)``."""
    from utils.image import save_mask
    from utils.video_io import VideoWriter

    frames, labels = render_sample(num_frames, size)
    os.makedirs(folder, exist_ok=True)
    video = os.path.join(folder, 'sample.mp4')
    first = os.path.join(folder, 'sample_mask.png')
    gt = os.path.join(folder, 'gt')
    os.makedirs(gt, exist_ok=True)
    with VideoWriter(video, fps=SAMPLE_FPS, size=size) as writer:
        for frame in frames:
            writer.write(frame)
    save_mask(labels[0], first)
    for i, label in enumerate(labels):
        save_mask(label, os.path.join(gt, f'{i:05d}.png'))
    return video, first, gt


def sample_scores(pred_labels, gt_labels):
    """DAVIS-style J, F and J&F (in [0, 1]) of predicted id maps against the ground truth:
    per object the mean over frames 1..N-1, then the mean over objects."""
    from utils.metrics import boundary_f_measure, region_similarity

    if len(pred_labels) != len(gt_labels):
        raise ValueError(f'{len(pred_labels)} predicted frames for {len(gt_labels)} '
                         f'ground-truth frames')
    objects = sorted(int(o) for o in np.unique(gt_labels[0]) if o)
    js, fs = [], []
    for oid in objects:
        j = [region_similarity(g == oid, p == oid) for p, g in zip(pred_labels[1:], gt_labels[1:])]
        f = [boundary_f_measure(g == oid, p == oid) for p, g in zip(pred_labels[1:],
                                                                       gt_labels[1:])]
        js.append(float(np.mean(j)))
        fs.append(float(np.mean(f)))
    j, f = float(np.mean(js)), float(np.mean(fs))
    return {'J': j, 'F': f, 'J&F': (j + f) / 2, 'per_object': {
        str(o): {'J': jo, 'F': fo} for o, jo, fo in zip(objects, js, fs)}}
