"""Lazy frame sources (video files, frame folders) and an atomic overlay-video writer.

A *frame source* is a sequence of RGB ``(H, W, 3)`` uint8 frames that decodes one frame at a
time, so a long video never sits in memory as a whole (the failure SAM 2 users hit when it
caches every frame). Both sources expose the same small interface:

- ``len(source)``, ``source.size`` ``(H, W)``, ``source.fps`` (``None`` when unknown),
  ``source.names`` (one name per frame: the file stem for folders, ``'00000'``... for videos);
- ``iter(source)`` / ``source.iter_frames(start)`` yield frames in order;
- ``source[i]`` decodes one frame (random access; sequential iteration is cheaper).

Use :func:`open_frames` to pick the right source for a path.
"""
import os
import re
import tempfile

import cv2
import numpy as np

from utils.io import give_default_mode

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class FrameSourceError(ValueError):
    """A video or frame folder that cannot be read; the message names the file."""


def natural_key(name):
    """Sort key that orders ``frame2`` before ``frame10`` (zero-padded names sort as usual)."""
    return [(0, int(tok), '') if tok.isdigit() else (1, 0, tok.lower())
            for tok in re.split(r'(\d+)', name) if tok]


class FrameFolder:
    """Frames stored as image files in one folder, ordered by name (numbers compared as numbers).

    Args:
        path: the folder; files whose extension is not an image extension are ignored.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FrameSourceError(f'{self.path}: not a folder of frames')
        files = [f for f in os.listdir(self.path)
                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
        if not files:
            raise FrameSourceError(f'{self.path}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
        files.sort(key=natural_key)
        self.files = [os.path.join(self.path, f) for f in files]
        self.names = [os.path.splitext(f)[0] for f in files]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise FrameSourceError(f'{self.path}: several frames share a name: {dup[:5]} '
                                   f'(e.g. 00001.jpg and 00001.png); keep one per frame')
        self.size = self._check_sizes()
        self.fps = None

    def _check_sizes(self):
        """``(H, W)`` of the frames, from every file's header (no decoding), so a frame of
        another size or a file that is not an image fails here, before any result is written."""
        from utils.image import image_size
        size = None
        for path in self.files:
            try:
                this = image_size(path)
            except ValueError as exc:
                raise FrameSourceError(str(exc)) from exc
            if size is None:
                size = this
            elif this != size:
                raise FrameSourceError(
                    f'{path}: frame is {this[1]}x{this[0]} (WxH) but {self.files[0]} is '
                    f'{size[1]}x{size[0]}; all frames of a video must have one size')
        return size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from utils.image import read_image
        if not -len(self) <= index < len(self):
            raise IndexError(f'{self.path}: frame {index} out of range (0..{len(self) - 1})')
        path = self.files[index]
        try:
            frame = read_image(path)
        except (FileNotFoundError, ValueError) as exc:
            raise FrameSourceError(str(exc)) from exc
        if frame.shape[:2] != tuple(self.size):
            raise FrameSourceError(
                f'{path}: frame is {frame.shape[1]}x{frame.shape[0]} (WxH) but the first frame '
                f'is {self.size[1]}x{self.size[0]}; all frames of a video must have one size')
        return frame

    def iter_frames(self, start=0):
        for index in range(start, len(self)):
            yield self[index]

    def __iter__(self):
        return self.iter_frames()

    def __repr__(self):
        return f'FrameFolder({self.path!r}, frames={len(self)}, size={self.size})'


class VideoFile:
    """Frames decoded on demand from a video file with OpenCV (``cv2.VideoCapture``).

    The frame count comes from the container; some files report it wrongly, so iteration
    stops at the first frame that cannot be decoded and :attr:`num_decoded` records how far
    it got.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FrameSourceError(f'{self.path}: video file not found')
        cap = self._open()
        try:
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            fps = float(cap.get(cv2.CAP_PROP_FPS))
            ok, first = cap.read()
        finally:
            cap.release()
        if not ok or first is None:
            raise FrameSourceError(f'{self.path}: cannot decode any frame (corrupt file or '
                                   f'a codec OpenCV does not have)')
        self.size = tuple(first.shape[:2])
        self.fps = fps if np.isfinite(fps) and fps > 0 else None
        if count <= 0:
            count = self._count_frames()  # streams without a frame count in the header
        self._len = max(count, 1)
        self.names = [f'{i:05d}' for i in range(self._len)]
        self.num_decoded = None

    def _open(self):
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            cap.release()
            raise FrameSourceError(f'{self.path}: cannot open the video (not a video file, '
                                   f'or a format OpenCV cannot read)')
        return cap

    def _count_frames(self):
        cap = self._open()
        count = 0
        try:
            while cap.grab():  # demuxes without decoding
                count += 1
        finally:
            cap.release()
        return count

    def __len__(self):
        return self._len

    def iter_frames(self, start=0):
        cap = self._open()
        try:
            if start:
                cap.set(cv2.CAP_PROP_POS_FRAMES, start)
            index = start
            while index < self._len:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    break
                index += 1
                yield np.ascontiguousarray(bgr[:, :, ::-1])
            self.num_decoded = index
        finally:
            cap.release()

    def __iter__(self):
        return self.iter_frames()

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f'{self.path}: frame {index} out of range (0..{len(self) - 1})')
        index %= len(self)
        for frame in self.iter_frames(index):
            return frame
        raise FrameSourceError(f'{self.path}: cannot decode frame {index}')

    def __repr__(self):
        return f'VideoFile({self.path!r}, frames={len(self)}, size={self.size}, fps={self.fps})'


def open_frames(path):
    """A :class:`FrameFolder` for a folder, a :class:`VideoFile` for anything else."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return FrameFolder(path)
    if not os.path.exists(path):
        raise FrameSourceError(f'{path}: no such video file or frame folder')
    return VideoFile(path)


class VideoWriter:
    """Write RGB frames to an mp4 (MPEG-4 Part 2, fourcc ``mp4v``), atomically.

    Frames go to a hidden temporary file next to ``path``, which is renamed to ``path`` by
    :meth:`close` (or on leaving a ``with`` block without an exception); on an error the
    temporary file is removed, so ``path`` is either complete or untouched.

    Args:
        path: destination ``.mp4``.
        fps: frame rate written into the container.
        size: ``(H, W)`` of every frame. The video is written at this size rounded up to even
            numbers (:attr:`video_size`; mp4v needs even sizes): odd sizes get one black row or
            column at the bottom or right, so no pixel of the frame is lost.
    """

    def __init__(self, path, fps, size):
        self.path = os.fspath(path)
        self.size = tuple(int(s) for s in size)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        # OpenCV picks the container from the extension, so the temporary name keeps '.mp4'.
        fd, self._tmp = tempfile.mkstemp(dir=folder, suffix='.mp4',
                                         prefix='.' + os.path.basename(self.path) + '.')
        os.close(fd)
        # mp4v needs even dimensions (OpenCV would silently crop 101x77 to 100x76): odd sizes
        # are padded by one black row / column at the bottom / right, never cropped.
        h, w = self.video_size = tuple(s + s % 2 for s in self.size)
        self._writer = cv2.VideoWriter(self._tmp, cv2.VideoWriter_fourcc(*'mp4v'), float(fps),
                                       (w, h))
        if not self._writer.isOpened():
            self._writer.release()
            os.remove(self._tmp)
            raise FrameSourceError(f'{self.path}: OpenCV cannot write an mp4v video here')
        self.frames_written = 0

    def write(self, frame):
        """Append one ``(H, W, 3)`` uint8 RGB frame."""
        frame = np.asarray(frame)
        if frame.shape != self.size + (3,) or frame.dtype != np.uint8:
            raise ValueError(f'{self.path}: frames must be {self.size + (3,)} uint8 RGB, got '
                             f'{frame.shape} {frame.dtype}')
        if self.video_size != self.size:
            padded = np.zeros(self.video_size + (3,), np.uint8)
            padded[:self.size[0], :self.size[1]] = frame
            frame = padded
        self._writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
        self.frames_written += 1

    def close(self):
        """Finish the file and move it into place."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        give_default_mode(self._tmp)
        os.replace(self._tmp, self.path)

    def abort(self):
        """Drop the partial file (``path`` is left as it was)."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
