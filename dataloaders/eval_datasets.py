"""Evaluation datasets: DAVIS 2016/2017, YouTube-VOS 2018/2019 (sparse and all-frames), custom.

Each ``*_Test`` object is a list of sequences; item ``i`` is a :class:`VOSTest`, a torch
``Dataset`` over the frames of one sequence. A frame sample is a dict (before the transform)::

    {'current_img': (H, W, 3) float32 RGB 0..255,
     'current_label': (H, W) uint8 contiguous ids   # only on frames with an annotation
     'meta': {'seq_name', 'frame_num', 'obj_num', 'current_name', 'height', 'width', 'flip',
              'obj_idx'}}

Ids in a sequence are made contiguous in order of appearance (sorted within a frame);
``meta['obj_idx'][k]`` is the original id of contiguous id ``k`` (``obj_idx[0] == 0``), so results
can be written with the user's original, possibly non-contiguous, ids. ``meta['height']`` and
``meta['width']`` are the size results are written at.

Readers have no side effects: nothing is written into result folders (the evaluator copies the
given first-frame annotations itself). Bad data raises an error naming the file.
"""
import json
import os
import warnings

import numpy as np
from torch.utils.data import Dataset

from utils.image import image_size, read_image, read_mask
from utils.video_io import natural_key

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class DatasetFormatError(ValueError):
    """A dataset folder that does not have the expected layout; the message names the path."""


def _stem(name):
    return os.path.splitext(name)[0]


def _list_frames(folder, natural=False):
    if not os.path.isdir(folder):
        raise DatasetFormatError(f'{folder}: frame folder not found')
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith('.')]
    if not names:
        raise DatasetFormatError(f'{folder}: no frames ({"/".join(IMAGE_EXTENSIONS)}) in the '
                                 f'sequence folder')
    return sorted(names, key=natural_key) if natural else sorted(names)


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise DatasetFormatError(f'{path}: {what} folder not found')
    return path


class VOSTest(Dataset):
    """The frames of one sequence, with the annotations given for some of them.

    Args:
        image_root: folder holding ``<seq_name>/<frame>``.
        label_root: folder holding ``<seq_name>/<stem>.png`` annotations.
        seq_name: sequence folder name.
        images: frame file names in temporal order; the first one must be annotated.
        labels: annotation file names (``<frame stem>.png``) for frames where objects are given.
        rgb: RGB frames (True) or BGR.
        transform: applied to each sample dict (e.g. MultiRestrictSize + MultiToTensor).
        single_obj: binarise annotations (``> 0`` is the object): DAVIS 2016.
        resolution: write results at this height (width scaled, rounded up) instead of the
            frame size: DAVIS results are 480p whatever the input resolution.
        max_obj_num: if given, a sequence with more objects raises an error.
        void_id: annotation value meaning "ignore" (DAVIS 255); read as background, with a
            warning. ``None`` keeps it as an object id.
    """

    def __init__(self, image_root, label_root, seq_name, images, labels, rgb=True, transform=None,
                 single_obj=False, resolution=None, max_obj_num=None, void_id=255):
        self.image_root = image_root
        self.label_root = label_root
        self.seq_name = seq_name
        self.images = [str(n) for n in images]
        self.labels = [str(n) for n in labels]
        self.rgb = rgb
        self.transform = transform
        self.single_obj = single_obj
        self.resolution = resolution
        self.max_obj_num = max_obj_num
        self.void_id = None if single_obj else void_id
        self.num_frame = len(self.images)

        seq_dir = os.path.join(image_root, seq_name)
        if not self.images:
            raise DatasetFormatError(f'{seq_dir}: sequence has no frames')
        missing = [n for n in self.images if not os.path.isfile(os.path.join(seq_dir, n))]
        if missing:
            more = f' and {len(missing) - 3} more' if len(missing) > 3 else ''
            raise DatasetFormatError(f'{seq_dir}: missing frames '
                                     f'{", ".join(missing[:3])}{more}')
        frame_of = {_stem(n): n for n in self.images}
        for name in self.labels:
            if _stem(name) not in frame_of:
                raise DatasetFormatError(
                    f'{self._label_path(name)}: annotation has no matching frame in {seq_dir}')
        self._label_of = {_stem(n): n for n in self.labels}
        if _stem(self.images[0]) not in self._label_of:
            raise DatasetFormatError(
                f'{self._label_path(_stem(self.images[0]) + ".png")}: the first frame '
                f'{os.path.join(seq_dir, self.images[0])} has no annotation')
        self.height, self.width = image_size(os.path.join(seq_dir, self.images[0]))

        # Object ids in order of appearance; obj_indices[i] includes frame i's new objects,
        # obj_nums[i] counts the objects known *before* frame i (frame 0: after it).
        self.obj_nums, self.obj_indices = [], []
        known = [0]
        for name in self.images:
            self.obj_nums.append(len(known) - 1)
            label_name = self._label_of.get(_stem(name))
            if label_name is not None:
                frame_size = image_size(os.path.join(seq_dir, name))
                label = self._read_raw_label(label_name)
                if label.shape != frame_size:
                    raise DatasetFormatError(
                        f'{self._label_path(label_name)}: mask is {label.shape[1]}x'
                        f'{label.shape[0]} (WxH) but frame {os.path.join(seq_dir, name)} is '
                        f'{frame_size[1]}x{frame_size[0]}')
                for obj in np.unique(label).tolist():
                    if obj not in known:
                        known.append(obj)
                if max_obj_num is not None and len(known) - 1 > max_obj_num:
                    raise DatasetFormatError(
                        f'{self._label_path(label_name)}: {len(known) - 1} objects in the '
                        f'sequence so far (ids {known[1:]}), more than max_obj_num='
                        f'{max_obj_num}')
            self.obj_indices.append(list(known))
        self.obj_nums[0] = len(self.obj_indices[0]) - 1
        if self.obj_nums[0] == 0:
            raise DatasetFormatError(
                f'{self._label_path(self._label_of[_stem(self.images[0])])}: the first '
                f'annotation of {seq_name} holds no object (all background)')

    def __len__(self):
        return self.num_frame

    def _label_path(self, label_name):
        return os.path.join(self.label_root, self.seq_name, label_name)

    def _read_raw_label(self, label_name):
        """Original ids: binarised for single-object data, void read as background."""
        path = self._label_path(label_name)
        # Palette void (255) is read as background by read_mask (the project-wide rule); a
        # single-object set's 255 is its object, so it is kept there.
        label = read_mask(path, void_id=None if self.single_obj else self.void_id)
        if self.single_obj:
            return (label > 0).astype(np.uint8)
        if self.void_id is not None:
            void = label == self.void_id
            if void.any():
                warnings.warn(f'{path}: {int(void.sum())} px with the void value {self.void_id} '
                              f'are read as background', stacklevel=2)
                label = np.where(void, 0, label)
        return label

    def read_label(self, label_name, obj_idx):
        """``(H, W)`` uint8 label with contiguous ids: original id ``obj_idx[k]`` becomes ``k``."""
        label = self._read_raw_label(label_name)
        lut = np.zeros(max(int(label.max(initial=0)), max(obj_idx)) + 1, dtype=np.uint8)
        lut[np.asarray(obj_idx, dtype=np.int64)] = np.arange(len(obj_idx), dtype=np.uint8)
        return lut[label]

    def read_image(self, idx):
        """Frame ``idx`` as ``(H, W, 3)`` float32, RGB (or BGR when ``rgb=False``)."""
        path = os.path.join(self.image_root, self.seq_name, self.images[idx])
        img = read_image(path)
        if img.shape[:2] != (self.height, self.width):
            raise DatasetFormatError(
                f'{path}: frame is {img.shape[1]}x{img.shape[0]} (WxH) but the first frame of '
                f'{self.seq_name} is {self.width}x{self.height}')
        if not self.rgb:
            img = img[:, :, ::-1]
        return np.ascontiguousarray(img, dtype=np.float32)

    def __getitem__(self, idx):
        name = self.images[idx]
        img = self.read_image(idx)
        height, width = img.shape[:2]
        if self.resolution is not None:
            width = int(np.ceil(float(width) * self.resolution / float(height)))
            height = int(self.resolution)
        obj_idx = [int(v) for v in self.obj_indices[idx]]
        sample = {'current_img': img}
        label_name = self._label_of.get(_stem(name))
        if label_name is not None:
            sample['current_label'] = self.read_label(label_name, obj_idx)
        sample['meta'] = {
            'seq_name': self.seq_name,
            'frame_num': self.num_frame,
            'obj_num': self.obj_nums[idx],
            'current_name': name,
            'height': height,
            'width': width,
            'flip': False,
            'obj_idx': obj_idx,
        }
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


class _SequenceList:
    """Common part of the ``*_Test`` classes: ``len``, indexing and iteration over sequences."""

    seqs = ()

    def __len__(self):
        return len(self.seqs)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def index(self, seq_name):
        return list(self.seqs).index(seq_name)


class DAVIS_Test(_SequenceList):
    """DAVIS 2017 (val, test-dev) or 2016 (val) from a ``DAVIS`` root.

    Layout: ``root/{JPEGImages,Annotations}/{480p,Full-Resolution}/<seq>/`` and
    ``root/ImageSets/<year>/<split>.txt`` (for 2016 the original package's
    ``ImageSets/480p/<split>.txt`` is accepted too). Only the first frame's annotation is used.
    DAVIS 2016 ground truth stores the object as 255: it is object 1 (``single_obj``), not void.

    Args:
        split: ``'val'``, ``'test'`` (= ``'test-dev'``), or a list of them.
        root: the DAVIS folder.
        year: 2017 or 2016.
        full_resolution: read ``Full-Resolution`` frames (results are still written at 480p).
        result_root: accepted for compatibility with upstream and ignored (no side effects).
    """

    def __init__(self, split='val', root='./datasets/DAVIS', year=2017, transform=None, rgb=True,
                 full_resolution=False, result_root=None, max_obj_num=None):
        del result_root
        self.root = root
        self.year = int(year)
        if self.year not in (2016, 2017):
            raise ValueError(f'DAVIS year must be 2016 or 2017, got {year}')
        self.transform = transform
        self.rgb = rgb
        self.single_obj = self.year == 2016
        self.max_obj_num = max_obj_num
        resolution = 'Full-Resolution' if full_resolution else '480p'
        _require_dir(root, 'DAVIS root')
        self.image_root = _require_dir(os.path.join(root, 'JPEGImages', resolution),
                                       'DAVIS JPEGImages')
        self.label_root = _require_dir(os.path.join(root, 'Annotations', resolution),
                                       'DAVIS Annotations')
        splits = [split] if isinstance(split, str) else list(split)
        names = []
        for spt in splits:
            names.extend(self._read_split(root, 'test-dev' if spt == 'test' else spt))
        self.seqs = sorted(set(names))
        for seq in self.seqs:
            _require_dir(os.path.join(self.image_root, seq), f'frame folder of sequence {seq}')

    def _read_split(self, root, split):
        path = os.path.join(root, 'ImageSets', str(self.year), split + '.txt')
        alt = os.path.join(root, 'ImageSets', '480p', split + '.txt')
        if not os.path.isfile(path) and self.year == 2016 and os.path.isfile(alt):
            path = alt
        if not os.path.isfile(path):
            raise DatasetFormatError(f'{path}: DAVIS sequence list not found')
        names = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if line.startswith('/'):
                    # DAVIS-2016 package: '/JPEGImages/480p/<seq>/00000.jpg /Annotations/...'
                    line = line.split()[0].split('/')[-2]
                names.append(line)
        return names

    def __getitem__(self, idx):
        seq_name = self.seqs[idx]
        images = _list_frames(os.path.join(self.image_root, seq_name))
        labels = [_stem(images[0]) + '.png']
        label_path = os.path.join(self.label_root, seq_name, labels[0])
        if not os.path.isfile(label_path):
            raise DatasetFormatError(f'{label_path}: first-frame annotation not found')
        return VOSTest(self.image_root, self.label_root, seq_name, images, labels,
                       rgb=self.rgb, transform=self.transform, single_obj=self.single_obj,
                       resolution=480, max_obj_num=self.max_obj_num)


def _youtubevos_split_root(root, year, split):
    """``root/<year>/<split>`` (aot layout) or ``root/<split>`` (a root that is the year folder)."""
    for candidate in (os.path.join(root, str(year), split), os.path.join(root, split)):
        if os.path.isdir(candidate):
            return candidate
    raise DatasetFormatError(f'{os.path.join(root, str(year), split)}: YouTube-VOS {year} '
                             f'{split} folder not found (also tried {os.path.join(root, split)})')


def _read_meta(path):
    if not os.path.isfile(path):
        raise DatasetFormatError(f'{path}: YouTube-VOS meta.json not found')
    try:
        with open(path) as f:
            return json.load(f)['videos']
    except (ValueError, KeyError) as exc:
        raise DatasetFormatError(f'{path}: not a YouTube-VOS meta.json ({exc})') from exc


def _meta_frames(meta, seq_name):
    """Sparse frame stems (union over objects) and the stems where some object first appears."""
    objects = meta[seq_name]['objects']
    frames = sorted({f for obj in objects.values() for f in obj['frames']})
    firsts = sorted({obj['frames'][0] for obj in objects.values() if obj['frames']})
    return frames, firsts


class YOUTUBEVOS_Test(_SequenceList):
    """YouTube-VOS 2018/2019 ``valid``: the frames listed in ``meta.json`` (every 5th frame).

    Layout: ``root/<year>/valid/{JPEGImages,Annotations}/<seq>/`` + ``meta.json``. Annotations
    exist where some object first appears (possibly after the first frame) and hold only the new
    objects; ids may be non-contiguous.
    """

    _split_aliases = {'val': 'valid'}

    def __init__(self, root='./datasets/YTB', year=2018, split='val', transform=None, rgb=True,
                 result_root=None, max_obj_num=None):
        del result_root
        split = self._split_aliases.get(split, split)
        self.root = _youtubevos_split_root(root, year, split)
        self.year = year
        self.transform = transform
        self.rgb = rgb
        self.max_obj_num = max_obj_num
        self.meta = _read_meta(os.path.join(self.root, 'meta.json'))
        self.seqs = list(self.meta)
        self.image_root = self._find_image_root()
        self.label_root = _require_dir(os.path.join(self.root, 'Annotations'),
                                       'YouTube-VOS Annotations')

    def _find_image_root(self):
        return _require_dir(os.path.join(self.root, 'JPEGImages'), 'YouTube-VOS JPEGImages')

    def __getitem__(self, idx):
        seq_name = self.seqs[idx]
        frames, firsts = _meta_frames(self.meta, seq_name)
        if not frames:
            raise DatasetFormatError(f'{os.path.join(self.root, "meta.json")}: video {seq_name} '
                                     f'lists no frames')
        return VOSTest(self.image_root, self.label_root, seq_name, [f + '.jpg' for f in frames],
                       [f + '.png' for f in firsts], rgb=self.rgb, transform=self.transform,
                       max_obj_num=self.max_obj_num)


class YOUTUBEVOS_DenseTest(YOUTUBEVOS_Test):
    """YouTube-VOS at the full frame rate: frames from ``valid_all_frames``, from the first to the
    last frame listed in ``valid/meta.json``; annotations from ``valid``.

    The returned sequence has ``images_sparse``: the frames the server scores, so the evaluator
    can also write the sparse result set.
    """

    _split_aliases = {'val': 'valid', 'val_all_frames': 'valid', 'valid_all_frames': 'valid'}

    def _find_image_root(self):
        sparse_split = os.path.basename(self.root)
        # aot layout: YTB/<year>/valid_all_frames; STCN layout: YouTube/all_frames/valid_all_frames
        candidates = [self.root + '_all_frames',
                      os.path.join(os.path.dirname(self.root), 'all_frames',
                                   sparse_split + '_all_frames')]
        self.dense_root = next((d for d in candidates if os.path.isdir(d)), None)
        if self.dense_root is None:
            raise DatasetFormatError(f'{candidates[0]}: YouTube-VOS all-frames folder not found '
                                     f'(also tried {candidates[1]})')
        return _require_dir(os.path.join(self.dense_root, 'JPEGImages'),
                            'YouTube-VOS all-frames JPEGImages')

    def __getitem__(self, idx):
        seq_name = self.seqs[idx]
        frames, firsts = _meta_frames(self.meta, seq_name)
        dense = _list_frames(os.path.join(self.image_root, seq_name))
        stems = [_stem(n) for n in dense]
        for f in (frames[0], frames[-1]):
            if f not in stems:
                raise DatasetFormatError(
                    f'{os.path.join(self.image_root, seq_name, f + ".jpg")}: frame listed in '
                    f'meta.json is missing from the all-frames folder')
        images = dense[stems.index(frames[0]):stems.index(frames[-1]) + 1]
        seq = VOSTest(self.image_root, self.label_root, seq_name, images,
                      [f + '.png' for f in firsts], rgb=self.rgb, transform=self.transform,
                      max_obj_num=self.max_obj_num)
        seq.images_sparse = [f + '.jpg' for f in frames]
        return seq


class CustomTest(_SequenceList):
    """A plain folder of videos: ``root/JPEGImages/<seq>/*.jpg`` + ``root/Annotations/<seq>/*.png``.

    Any number of annotation PNGs per sequence, named after their frame; objects may first
    appear in later annotations. A sequence starts at its first annotated frame. Frames are
    ordered by natural sort (``2.jpg`` before ``10.jpg``).

    Args:
        root: folder holding ``JPEGImages`` and ``Annotations``.
        seqs: sequence names to use (default: every folder of ``JPEGImages``).
        single_obj: binarise annotations.
        resolution: results height (default: the frame size).
    """

    def __init__(self, root, transform=None, rgb=True, seqs=None, single_obj=False,
                 resolution=None, max_obj_num=None):
        self.root = root
        self.transform = transform
        self.rgb = rgb
        self.single_obj = single_obj
        self.resolution = resolution
        self.max_obj_num = max_obj_num
        _require_dir(root, 'dataset root')
        self.image_root = _require_dir(os.path.join(root, 'JPEGImages'), 'JPEGImages')
        self.label_root = _require_dir(os.path.join(root, 'Annotations'), 'Annotations')
        if seqs is None:
            seqs = sorted(d for d in os.listdir(self.image_root)
                          if os.path.isdir(os.path.join(self.image_root, d)))
            if not seqs:
                raise DatasetFormatError(f'{self.image_root}: no sequence folders')
        self.seqs = list(seqs)
        for seq in self.seqs:
            _require_dir(os.path.join(self.image_root, seq), f'frame folder of sequence {seq}')
            _require_dir(os.path.join(self.label_root, seq), f'annotation folder of sequence {seq}')

    def __getitem__(self, idx):
        seq_name = self.seqs[idx]
        images = _list_frames(os.path.join(self.image_root, seq_name), natural=True)
        label_dir = os.path.join(self.label_root, seq_name)
        labels = sorted((n for n in os.listdir(label_dir)
                         if n.lower().endswith('.png') and not n.startswith('.')),
                        key=natural_key)
        if not labels:
            raise DatasetFormatError(f'{label_dir}: no annotation PNGs for sequence {seq_name}')
        stems = [_stem(n) for n in images]
        for name in labels:
            if _stem(name) not in stems:
                raise DatasetFormatError(f'{os.path.join(label_dir, name)}: annotation has no '
                                         f'matching frame in '
                                         f'{os.path.join(self.image_root, seq_name)}')
        start = min(stems.index(_stem(n)) for n in labels)
        return VOSTest(self.image_root, self.label_root, seq_name, images[start:], labels,
                       rgb=self.rgb, transform=self.transform, single_obj=self.single_obj,
                       resolution=self.resolution, max_obj_num=self.max_obj_num)
