"""``VideoObjectSegmenter``: segment your own video in a few lines.

::

    seg = VideoObjectSegmenter()          # the shipped distilled student, deaott_gda
    # or VideoObjectSegmenter('deaott', ckpt_path='pretrain_models/DeAOTT_PRE_YTB_DAV.pth')
    seg.open('video.mp4')                 # or a folder of frames; decoded one frame at a time
    seg.add_mask(0, 'first_frame.png')    # an id map: 0 = background, any ids you like
    for frame_idx, label, probs in seg.propagate():
        ...                               # label: (H, W) ids as given; probs: {id: (H, W)}

or, for a live stream, ``label = seg.step(frame, mask=None).label`` one frame at a time.

The state of one video lives in this object (SAM 2's ``inference_state`` and Cutie's
``InferenceCore`` put it in one place too). Under it, the engine is driven exactly as upstream's
evaluator drives it (``tools/eval.py``): test-time resize and normalisation of each frame, labels
resized to the network input with nearest, logits decoded at the frame size, softmax, argmax,
``update_memory`` with the argmax label, and for a frame with a new mask
``merged = pred * (mask == 0) + mask`` then ``add_reference_frame``, ``decode_current_logits``,
``update_memory``. With ``long_term_mem_max=None`` the output equals that loop.

Differences from the evaluator, all opt-in or invisible when unused:

* **Bounded memory** (``long_term_mem_max``, default 8): at most that many frames are kept in
  each sub-engine's long-term memory; the oldest frame that is not a reference frame is dropped,
  reference frames (where masks were given) are always kept (see
  :class:`~networks.engines.memory.VOSMemory`). Short-term memory is one frame. So memory stays
  flat on arbitrarily long videos.
* **Object ids as given**: user ids (e.g. {3, 8, 200}) map to contiguous engine ids (1, 2, 3, in
  order of first appearance, ascending within one mask) and back; outputs use the user's ids.
* **Removing an object** masks its engine channel out for good: its logits are set to ``-inf``
  before the softmax, so its pixels go to the next most likely label, it is never emitted again
  and never written into memory again. Re-referencing the current frame without it would not
  work: the object's identity stays in the older long-term entries (reference frames are
  never dropped), so the network would keep predicting that channel; restarting the engine would
  lose every other object's history. Its slot is not reused. Adding a mask with the same id later
  starts a new object.
* **Corrections**: a mask for an object that is already tracked replaces that object on that
  frame (its predicted pixels outside the new mask go to the next most likely label). For masks
  of new objects only this is exactly the evaluator's merge.
"""
import contextlib
import os
import time
import warnings
from typing import Dict, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from configs.default import load_model_config
from dataloaders.eval_transforms import MultiRestrictSize, MultiToTensor
from networks.engines import build_engine
from networks.engines.memory import APP_LONG_TERM_MEM_MAX
from networks.engines.postprocess import channel_argmax
from networks.managers.onnx_backend import OnnxInferEngine, open_for_segmenter
from networks.models import allowed_missing_prefixes, load_vos_model
from networks.models.zoo import DEFAULT_MODEL, PRETRAIN_DIR, expected_files, find_checkpoint
from utils.checkpoint import load_network
from utils.device import resolve_channels_last, resolve_device, resolve_precision
from utils.image import read_mask
from utils.video_io import open_frames

DEFAULT_MAX_RESOLUTION = 480 * 1.3  # upstream's --max_resolution: long edge <= 624*800/480 = 1040
AUTO_WEIGHTS = 'auto'  # ckpt_path default: the model id's weights from pretrain_models/


_UNSET = object()


class UntrainedWeightsWarning(UserWarning):
    """A model id was asked for and no trained weights for it were found."""


class FrameOutput(NamedTuple):
    """Result for one frame.

    ``label``: ``(H, W)`` user object ids (uint8 when every id is below 256, else int32);
    ``probs``: ``{object id: (H, W) float32 probability}`` for every tracked object (``None`` when
    the segmenter was built with ``return_probs=False``).
    """
    frame_idx: int
    label: np.ndarray
    probs: Optional[Dict[int, np.ndarray]]


def _as_id_map(mask, what):
    """Array-like -> ``(H, W)`` int64 ids, with a clear error for anything else."""
    if torch.is_tensor(mask):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask.reshape(mask.shape[:2] if mask.shape[-1] == 1 else mask.shape[1:])
    if mask.ndim != 2:
        raise ValueError(f'{what}: expected an (H, W) id map, got shape {mask.shape} (for RGB '
                         f'renderings of masks pass the file path, which read_mask decodes)')
    if mask.dtype == bool:
        return mask.astype(np.int64)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise ValueError(f'{what}: a float mask must hold whole numbers (object ids)')
    elif not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f'{what}: unsupported mask dtype {mask.dtype}')
    mask = mask.astype(np.int64)
    if mask.size and mask.min() < 0:
        raise ValueError(f'{what}: negative values in a mask (ids are >= 0, 0 = background)')
    return mask


class VideoObjectSegmenter:
    """Semi-supervised video object segmentation of one video at a time.

    Args:
        model: a model id (``'deaott'``, ``'r50_deaotl'``, ...) or an already built
            AOT/DeAOT module (with its ``cfg``); ``cfg`` overrides the id's config (e.g. a GDA
            student: a DeAOT config with ``MODEL_LT_ATTENTION = 'deformable'``).
        ckpt_path: checkpoint to load (upstream layouts accepted). The default, ``'auto'``,
            takes a model id's weights from ``pretrain_models/`` (a released upstream file, else
            the project's shipped weights: ``networks/models/zoo.py``), warning with
            :class:`UntrainedWeightsWarning` when there are none; for a built module it keeps
            the module's weights. ``None``: the weights stay as built (random for a model id),
            which is only good for testing.
        device: ``'cuda'``, ``'cpu'``... (default: CUDA when available).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``; other than float32 runs
            the network under ``torch.autocast``.
        amp: shorthand for the usual autocast dtype: bf16 on CPU, fp16 on CUDA.
        long_term_mem_max: cap on long-term memory frames per sub-engine (reference frames
            are always kept, the oldest other frame is dropped first); ``None``:
            unbounded as upstream (memory grows with the video). The same name as the
            config's ``TEST_LONG_TERM_MEM_MAX`` and the CLIs' ``--lt_max`` (docs/memory.md:
            8 here, for applications; unbounded in ``tools/eval.py``, upstream's protocol).
            ``max_memory_frames`` is accepted as its former name.
        long_term_mem_gap: store a frame in long-term memory every ``gap`` frames
            (default: the model's ``TEST_LONG_TERM_MEM_GAP``).
        short_term_mem_skip: default the model's ``TEST_SHORT_TERM_MEM_SKIP``.
        max_resolution: upstream's ``--max_resolution``: frames are resized so that the long
            edge is at most ``max_resolution * 800 / 480`` (``None``: no limit), then aligned to
            the network stride; outputs are always at the frame's own size.
        return_probs: also return per-object probabilities (a copy per object per frame).
        backend: ``'torch'`` (default) or ``'onnxruntime'``: run the files that
            ``tools/export_onnx.py`` wrote (``ckpt_path`` = the exported ``.onnx``; ``model``
            must be the id it was exported from) with the same memory policy
            (``networks/managers/onnx_backend.py``). Float32 on the CPU only.
        onnx_threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()``).
        channels_last: run the encoder in channels-last layout (``None``: on the CPU, where
            it is faster; same values to float rounding). A module passed as ``model`` is
            left as it is.
    """

    def __init__(self, model=DEFAULT_MODEL, ckpt_path=AUTO_WEIGHTS, device=None, dtype=None,
                 amp=False, long_term_mem_max=APP_LONG_TERM_MEM_MAX, long_term_mem_gap=None,
                 short_term_mem_skip=None, max_resolution=DEFAULT_MAX_RESOLUTION,
                 return_probs=True, cfg=None, backend='torch', onnx_threads=None,
                 channels_last=None, max_memory_frames=_UNSET):
        self.device = resolve_device(device)
        self.backend = backend
        self.onnx = None
        if backend not in ('torch', 'onnxruntime'):
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        if backend == 'onnxruntime':
            self.onnx, self.cfg = open_for_segmenter(model, ckpt_path, self.device, dtype, amp,
                                                     onnx_threads)
            self.model, self.load_report = None, None
        elif isinstance(model, torch.nn.Module):
            if ckpt_path == AUTO_WEIGHTS:  # a built module keeps the weights it has
                ckpt_path = None
            self.cfg = cfg if cfg is not None else model.cfg
            self.load_report = None
            if ckpt_path:
                model, self.load_report = load_network(
                    model, ckpt_path, allow_missing_prefixes=allowed_missing_prefixes(self.cfg))
            self.model = model.to(self.device).eval()
        else:
            if ckpt_path == AUTO_WEIGHTS:
                name = (cfg if cfg is not None else load_model_config(model)).MODEL_NAME
                ckpt_path = find_checkpoint(model, name)
                if ckpt_path is None:
                    warnings.warn(f'no trained weights for {model!r} in {PRETRAIN_DIR} (looked '
                                  f'for {", ".join(expected_files(model, name))}): the model '
                                  f'has UNTRAINED random weights and its masks are meaningless',
                                  UntrainedWeightsWarning, stacklevel=2)
            self.cfg, self.model, self.load_report = load_vos_model(
                model, ckpt_path=ckpt_path, device=self.device, cfg=cfg)
            # A model built here (not one the caller passed in) gets the fast layout.
            self.model.set_channels_last(resolve_channels_last(channels_last, self.device))
        self.model_id = getattr(self.cfg, 'MODEL_ID', str(model))
        self.ckpt_path = ckpt_path
        self.dtype = resolve_precision(dtype, amp, self.device)
        if max_memory_frames is not _UNSET:   # the former name of the same setting
            long_term_mem_max = max_memory_frames
        if long_term_mem_max is not None and int(long_term_mem_max) < 1:
            raise ValueError(f'long_term_mem_max must be >= 1 (the reference frame) or None '
                             f'(unbounded), got {long_term_mem_max}')
        self.long_term_mem_max = None if long_term_mem_max is None else int(long_term_mem_max)
        self.long_term_mem_gap = int(long_term_mem_gap or self.cfg.TEST_LONG_TERM_MEM_GAP)
        self.short_term_mem_skip = int(short_term_mem_skip or self.cfg.TEST_SHORT_TERM_MEM_SKIP)
        self.max_resolution = max_resolution
        self.return_probs = return_probs
        long_edge = None if max_resolution is None else max_resolution * 800. / 480.
        self._resize = MultiRestrictSize(None, long_edge, flip=False, multi_scale=[1.],
                                         align_corners=self.cfg.MODEL_ALIGN_CORNERS)
        self._to_tensor = MultiToTensor()
        self.source = None
        self._reader = None
        self.reset()

    # -- video and state --------------------------------------------------------------
    def open(self, video):
        """Use a video file or a frame folder (or any frame source of ``utils.video_io``).

        Frames are decoded one at a time during :meth:`propagate`. Resets the state.
        """
        self.close()
        self.source = open_frames(video) if isinstance(video, (str, os.PathLike)) else video
        self.reset()
        self.frame_size = tuple(self.source.size)
        return self

    @property
    def num_frames(self):
        return None if self.source is None else len(self.source)

    def close(self):
        """Release the opened video (the segmenter can open another one)."""
        self._drop_reader()
        self.source = None
        self.reset()

    def _drop_reader(self):
        reader = getattr(self, '_reader', None)
        if reader is not None:
            reader[0].close()
        self._reader = None

    def reset(self):
        """Forget memory, objects and pending masks; an opened video stays open."""
        self._drop_reader()
        self.engine = None
        self.frame_idx = 0            # next frame to segment
        self._ref_frame = None        # frame of the first reference (engine step 0)
        self._prompts = {}            # frame -> (H, W) user ids, not yet consumed
        self._removals = {}           # frame -> user ids to drop before that frame
        self._user_to_engine = {}     # tracked user id -> engine id
        self._engine_to_user = [0]    # engine id -> user id (removed ones included)
        self._removed = []            # engine ids masked out for good
        self.frame_size = None if self.source is None else tuple(self.source.size)
        self.stats = {'frames': 0, 'seconds': 0.0}

    @property
    def objects(self):
        """User ids tracked now (in the order they were added)."""
        return sorted(self._user_to_engine, key=self._user_to_engine.get)

    @property
    def fps(self):
        """Frames per second of the per-frame work on the device (resize and normalisation,
        network, logits at frame size); reading frames and copying outputs to the CPU are
        not counted."""
        s = self.stats
        return s['frames'] / s['seconds'] if s['seconds'] > 0 else float('nan')

    # -- memory introspection ---------------------------------------------------------
    @property
    def num_long_term_tokens(self):
        """Tokens in the first sub-engine's long-term memory (per layer)."""
        return 0 if self.engine is None else self.engine.num_long_term_tokens

    @property
    def num_long_term_frames(self):
        if self.engine is None:
            return 0
        return max(e.memory.num_long_term_frames for e in self.engine.aot_engines)

    def memory_bytes(self):
        """Bytes of the memory entries every sub-engine stores (long- and short-term).

        Not counted: the concatenated long-term view the attention reads, a cache of the same
        size as the long-term part that :class:`VOSMemory` rebuilds after each write.
        """
        if self.engine is None:
            return 0
        seen, total = set(), 0
        for eng in self.engine.aot_engines:
            mem = eng.memory
            entries = [e for layer in mem.long_term for e in layer]
            entries += [e for frame in mem.short_term_queue for e in frame]
            for entry in entries:
                for t in (entry.key, entry.value, entry.id_value):
                    if t is None:
                        continue
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
        return total

    # -- prompts ----------------------------------------------------------------------
    def add_mask(self, frame_idx, mask, obj_id=None):
        """Give the mask of one or more objects on a frame not segmented yet.

        Args:
            frame_idx: frame index (``>=`` the next frame to segment).
            mask: an ``(H, W)`` id map (array/tensor; 0 = background, ids kept as given, need
                not be contiguous) or the path of a mask file (palette, grayscale 0/255 or 0/1,
                RGB palette colours, anti-aliased: see ``utils.image.read_mask``). With
                ``obj_id``, a binary mask of that one object.
            obj_id: see ``mask``.
        Returns:
            The ids this frame's masks hold now. Masks for one frame accumulate; each object
            named in a new mask is replaced by it.
        """
        frame_idx = int(frame_idx)
        what = f'mask for frame {frame_idx}'
        if isinstance(mask, (str, os.PathLike)):
            what = os.fspath(mask)
            ids = read_mask(mask, size=self.frame_size).astype(np.int64)
        else:
            ids = _as_id_map(mask, what)
        if frame_idx < self.frame_idx:
            raise ValueError(f'{what}: frame {frame_idx} is already segmented (next frame is '
                             f'{self.frame_idx}); masks go on frames not segmented yet, or call '
                             f'reset() to start over')
        if self.source is not None and frame_idx >= len(self.source):
            raise IndexError(f'{what}: frame {frame_idx} is beyond the video '
                             f'({len(self.source)} frames)')
        if self.frame_size is not None and tuple(ids.shape) != tuple(self.frame_size):
            raise ValueError(f'{what}: mask is {ids.shape[1]}x{ids.shape[0]} (WxH) but the '
                             f'frames are {self.frame_size[1]}x{self.frame_size[0]}; masks must '
                             f'have the frame size')
        if obj_id is not None:
            obj_id = int(obj_id)
            if obj_id < 1:
                raise ValueError(f'{what}: object ids are >= 1 (0 is background), got {obj_id}')
            if not ids.any():
                raise ValueError(f'{what}: the mask of object {obj_id} is empty; use '
                                 f'remove_object() to stop tracking an object')
            ids = np.where(ids > 0, obj_id, 0)
        if not ids.any():
            return sorted(int(v) for v in np.unique(self._prompts.get(frame_idx, ids)) if v)
        prompt = self._prompts.get(frame_idx)
        if prompt is None:
            prompt = np.zeros_like(ids)
        elif prompt.shape != ids.shape:
            raise ValueError(f'{what}: size {ids.shape} differs from the mask already given for '
                             f'frame {frame_idx} {prompt.shape}')
        new_ids = np.unique(ids[ids > 0])
        prompt = np.where(np.isin(prompt, new_ids), 0, prompt)   # named objects are replaced
        prompt = np.where(ids > 0, ids, prompt)
        # Kept compact: a stream may carry a mask for many frames before they are reached.
        self._prompts[frame_idx] = prompt.astype(np.uint8 if prompt.max() <= 255 else np.int32)
        return [int(v) for v in np.unique(prompt) if v]

    def remove_object(self, obj_id, frame_idx=None):
        """Stop tracking ``obj_id`` from ``frame_idx`` on (default: the next frame).

        The object is erased from masks already given for that frame and later ones, and its
        output channel is masked out for good (module docstring). A mask with this id given
        afterwards starts a new object.
        """
        obj_id = int(obj_id)
        frame_idx = self.frame_idx if frame_idx is None else int(frame_idx)
        if frame_idx < self.frame_idx:
            raise ValueError(f'remove_object({obj_id}): frame {frame_idx} is already segmented '
                             f'(next frame is {self.frame_idx})')
        prompted = {f for f, p in self._prompts.items() if (p == obj_id).any()}
        if obj_id not in self._user_to_engine and not prompted:
            known = sorted(set(self._user_to_engine) | {int(v) for p in self._prompts.values()
                                                        for v in np.unique(p) if v})
            raise KeyError(f'remove_object: no object {obj_id} (objects: {known})')
        pending = sorted(f for f in prompted if f >= frame_idx)
        for f in pending:
            prompt = np.where(self._prompts[f] == obj_id, 0, self._prompts[f])
            if prompt.any():
                self._prompts[f] = prompt
            else:
                del self._prompts[f]
        self._removals.setdefault(frame_idx, set()).add(obj_id)

    # -- running ----------------------------------------------------------------------
    def propagate(self, max_frames=None):
        """Segment the opened video from the next frame on, yielding :class:`FrameOutput`.

        Frames before the first mask yield an empty label. Masks may be added for later
        frames and objects removed while iterating. ``max_frames`` stops early; a later call
        continues where this one stopped.
        """
        if self.source is None:
            raise RuntimeError('open() a video or frame folder first (or use step())')
        if self.engine is None and not self._prompts:
            raise RuntimeError('add_mask() for at least one frame first')
        stop = len(self.source)
        if max_frames is not None:
            stop = min(stop, self.frame_idx + int(max_frames))
        while self.frame_idx < stop:
            frame = self._next_source_frame()
            if frame is None:   # the container announced more frames than it holds
                break
            yield self._advance(frame)

    def _next_source_frame(self):
        # One decoder kept open across propagate() calls, so continuing never seeks.
        if self._reader is None or self._reader[1] != self.frame_idx:
            self._drop_reader()
            self._reader = [self.source.iter_frames(self.frame_idx), self.frame_idx]
        frame = next(self._reader[0], None)
        self._reader[1] += 1
        return frame

    def step(self, frame, mask=None):
        """Segment the next frame of a stream: ``frame`` ``(H, W, 3)`` uint8 RGB, with an
        optional mask (as for :meth:`add_mask`) given on this frame. Returns a
        :class:`FrameOutput`."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f'step: a frame is (H, W, 3) uint8 RGB, got {frame.shape} '
                             f'{frame.dtype}')
        if self.frame_size is None:
            self.frame_size = tuple(frame.shape[:2])
        if mask is not None:
            self.add_mask(self.frame_idx, mask)
        return self._advance(frame)

    def _advance(self, frame):
        if tuple(frame.shape[:2]) != tuple(self.frame_size):
            raise ValueError(f'frame {self.frame_idx} is {frame.shape[1]}x{frame.shape[0]} '
                             f'(WxH), the video is {self.frame_size[1]}x{self.frame_size[0]}')
        out = self._segment(frame, self.frame_idx)
        self.frame_idx += 1
        return out

    # -- one frame, the evaluator's way --------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _preprocess(self, frame):
        """``(H, W, 3)`` uint8 RGB -> ``(1, 3, h, w)`` network input (upstream's test-time
        resize and normalisation)."""
        sample = self._to_tensor(self._resize({'current_img': frame}))[0]
        return sample['current_img'][None].to(self.device, non_blocking=True)

    def _engine_ids(self, prompt):
        """User-id prompt -> engine-id tensor ``(1, 1, H, W)``; new ids get new engine ids."""
        lut = {}
        for uid in np.unique(prompt[prompt > 0]).tolist():
            eid = self._user_to_engine.get(uid)
            if eid is None:
                eid = len(self._engine_to_user)
                self._engine_to_user.append(uid)
                self._user_to_engine[uid] = eid
            lut[uid] = eid
        mapped = np.zeros(prompt.shape, dtype=np.int64)
        for uid, eid in lut.items():
            mapped[prompt == uid] = eid
        gt = torch.from_numpy(mapped).to(self.device)[None, None].float()
        return gt, sorted(lut.values())

    def _segment(self, frame, index):
        for uid in sorted(self._removals.pop(index, ())):
            eid = self._user_to_engine.pop(uid, None)
            if eid is not None:
                self._removed.append(eid)
        prompt = self._prompts.pop(index, None)
        size = tuple(frame.shape[:2])
        if self.engine is None and prompt is None:
            return self._output(index, torch.zeros(size, dtype=torch.long), None)

        sync = self.device.type == 'cuda'
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        img = self._preprocess(frame)
        in_size = tuple(img.shape[-2:])
        with torch.inference_mode(), self._autocast():
            if self.engine is None:
                gt, _ = self._engine_ids(prompt)
                self._ref_frame = index
                self.engine = self._build_engine()
                self.engine.add_reference_frame(
                    img, F.interpolate(gt, size=in_size, mode='nearest'), frame_step=0,
                    obj_nums=[len(self._engine_to_user) - 1])
                label = gt[0, 0].long()
                prob = F.one_hot(label, len(self._engine_to_user)).permute(2, 0, 1)[None].float()
            else:
                self.engine.match_propogate_one_frame(img)
                # Live channels only: labels and probabilities as with all 11, less to resize.
                logits = self.engine.decode_current_logits(size, live_only=True).float()
                if self._removed:
                    removed = torch.as_tensor(self._removed, device=logits.device)
                    logits = logits.index_fill(1, removed, float('-inf'))
                prob = torch.softmax(logits, dim=1)
                if prompt is None:
                    label = channel_argmax(prob)[0]
                    self.engine.update_memory(
                        F.interpolate(label[None, None].float(), size=in_size, mode='nearest'))
                else:
                    label, prob = self._merge_prompt(prob, prompt, img, index, in_size)
        if sync:
            torch.cuda.synchronize(self.device)
        self.stats['frames'] += 1
        self.stats['seconds'] += time.perf_counter() - start
        return self._output(index, label, prob)

    def _build_engine(self):
        kwargs = dict(long_term_mem_gap=self.long_term_mem_gap,
                      short_term_mem_skip=self.short_term_mem_skip,
                      long_term_mem_max=self.long_term_mem_max)
        if self.onnx is not None:
            return OnnxInferEngine(self.onnx, **kwargs)
        return build_engine(self.cfg.MODEL_ENGINE, phase='eval', aot_model=self.model, **kwargs)

    def _merge_prompt(self, prob, prompt, img, index, in_size):
        """A mask on a propagated frame: merge it into the prediction and re-reference.

        Prompted pixels get their object with probability 1; objects named in the mask lose
        their predicted pixels elsewhere; everything else keeps the prediction, so for new
        objects ``label = pred * (mask == 0) + mask`` as in the evaluator.
        """
        gt, eids = self._engine_ids(prompt)
        n_ids = len(self._engine_to_user)
        if prob.shape[1] < n_ids:   # a new sub-engine is about to be created
            prob = F.pad(prob, (0, 0, 0, 0, 0, n_ids - prob.shape[1]))
        fg = gt[:, 0] > 0                                                  # (1, H, W)
        named = torch.as_tensor(eids, device=prob.device)
        prob = prob.index_fill(1, named, 0.)
        one_hot = F.one_hot(gt[:, 0].long(), prob.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
        prob = torch.where(fg[:, None], one_hot, prob)
        label = channel_argmax(prob)[0]
        label_in = F.interpolate(label[None, None].float(), size=in_size, mode='nearest')
        self.engine.add_reference_frame(img, label_in, obj_nums=[n_ids - 1],
                                        frame_step=index - self._ref_frame)
        self.engine.decode_current_logits()  # state as upstream, without its discarded resize
        self.engine.update_memory(label_in)
        return label, prob

    def _output(self, index, label, prob):
        """Engine ids -> user ids, on the CPU."""
        lut = np.asarray(self._engine_to_user, dtype=np.int64)
        ids = lut[label.cpu().numpy()]
        ids = ids.astype(np.uint8 if lut.max(initial=0) <= 255 else np.int32)
        probs = None
        if self.return_probs:
            probs = {}
            tracked = [(u, e) for u, e in self._user_to_engine.items()]
            if tracked and prob is not None:
                eids = torch.as_tensor([e for _, e in tracked], device=prob.device)
                chosen = prob[0].index_select(0, eids).float().cpu().numpy()
                probs = {u: chosen[i] for i, (u, _) in enumerate(tracked)}
        return FrameOutput(index, ids, probs)
