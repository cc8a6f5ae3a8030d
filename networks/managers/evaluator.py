"""Benchmark evaluation: run a VOS model over a test set and write the result masks.

:class:`Evaluator` drives the inference engine over every sequence of DAVIS 2016/2017,
YouTube-VOS 2018/2019 (sparse or all frames) or a plain custom folder, the way upstream
aot-benchmark's evaluator does, so published checkpoints reproduce their numbers:

* one engine per test-time augmentation (scales x optional flip), fed the frame sized by
  ``MultiRestrictSize``; labels are resized to the engine's input size with ``nearest``;
* each augmentation decodes its logits at the output size, flips them back *before* the
  softmax, and the prediction is the argmax of the mean of the softmaxes;
* each augmentation's engine writes its **own** argmax into memory, not the ensemble's
  (upstream behaviour, kept for benchmark parity; docs/upstream_differences.md, row 13);
* at a frame with annotations (YouTube-VOS objects appearing mid-video) the given objects are
  pasted over the prediction and every engine re-references that frame:
  ``add_reference_frame`` then ``decode_current_logits`` then ``update_memory``;
* results are palette PNGs (upstream's palette) holding the **original** object ids, in
  upstream's folder layout and names::

      <DIR_EVALUATION>/<dataset>/<eval_name>/Annotations[/480p]/<seq>/<frame>.png
      <DIR_EVALUATION>/<dataset>/<eval_name>.zip        (YouTube-VOS: Annotations/<seq>/...)
      <DIR_EVALUATION>/<dataset>/<eval_name>_sparse/... (YouTube-VOS val_all_frames)

  with ``eval_name = <dataset>_<split>_<EXP_NAME>_<STAGE_NAME>_ckpt_<step|test|stem_hash>``
  followed by ``_ema``, ``_flip`` and ``_ms_<scales>`` as they apply.

Where this differs from upstream (resume markers, settings-checked result folders, the
new-object count, atomic zips, J&F scoring, timing) is listed in docs/upstream_differences.md
("Evaluation").
"""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders.eval_datasets import (DAVIS_Test, YOUTUBEVOS_DenseTest, YOUTUBEVOS_Test,
                                       CustomTest)
from dataloaders.eval_transforms import build_eval_transform
from networks.engines import build_engine
from networks.engines.postprocess import channel_argmax
from networks.managers.eval_paths import (checkpoint_tag, eval_name,  # noqa: F401  (public here too)
                                          resolve_checkpoint, write_zip)
from networks.models import build_vos_model, load_vos_model
from utils.image import save_mask
from utils.device import (peak_memory_mb, resolve_channels_last, resolve_device,
                          resolve_precision)
from utils.io import atomic_write_json, file_sha256
from utils.metrics import evaluate_davis
from utils.timing import FrameTimer

DATASETS = ('davis2017', 'davis2016', 'youtubevos2018', 'youtubevos2019', 'custom')
SPLITS = ('val', 'val_all_frames', 'test')
PROGRESS_DIR = 'progress'
SETTINGS_FILE = 'settings.json'
TIMING_FILE = 'timing.json'
TEST_CKPT_SEED = 0
_MAX_PENDING_WRITES = 64


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stem(name):
    return os.path.splitext(name)[0]


def _resize_nearest(label, size):
    """``(1, 1, H, W)`` float labels -> ``size`` with nearest (upstream's label resizing)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label, size=tuple(size), mode='nearest')


def _to_original_ids(label, obj_idx):
    """``(H, W)`` contiguous ids -> original ids (uint8 numpy) through ``obj_idx``."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:len(obj_idx)] = np.asarray(obj_idx, dtype=np.int64)
    return lut[np.asarray(label, dtype=np.int64)]


# ------------------------------------------------------------------------------------------
# Evaluator
# ------------------------------------------------------------------------------------------

class Evaluator:
    """Evaluate ``cfg``'s model on ``cfg.TEST_DATASET`` / ``cfg.TEST_DATASET_SPLIT``.

    Args:
        cfg: an engine config (``configs.default.build_config``) with the ``TEST_*`` fields,
            ``DIR_DAVIS`` / ``DIR_YTB`` / ``DIR_DATA`` (custom) and ``DIR_EVALUATION``.
        rank: process index (GPU ``TEST_GPU_ID + rank``).
        seq_queue: multi-process runs: a queue of sequence indices ended by ``'END'``. Without
            it, :meth:`evaluating` does every unfinished sequence and then finalises the run.
        device: ``'cuda'``, ``'cpu'`` or a ``torch.device``; default CUDA when available.
        amp: run the network under ``torch.autocast``: ``True`` for the device's usual dtype
            (float16 on CUDA, bfloat16 on CPU) or a precision name (``'bf16'``, ``'fp16'``;
            ``'fp32'`` = off). Labels are taken in float32 either way.
        workers: data-loading processes per sequence (default ``cfg.TEST_WORKERS``).
        verbose: print one line per sequence and the summary.

    The model is built (and the checkpoint loaded) on first use, so a launching process can
    plan and finalise a multi-process run without building it.
    """

    def __init__(self, cfg, rank=0, seq_queue=None, info_queue=None, device=None, amp=False,
                 workers=None, verbose=True):
        del info_queue  # upstream's statistics queue: ours go through the progress files
        self.cfg = cfg
        self.rank = rank
        self.seq_queue = seq_queue
        self.verbose = verbose
        workers = cfg.TEST_WORKERS if workers is None else int(workers)
        self.workers = max(0, min(workers, _available_cores()))
        device = resolve_device(device, gpu=cfg.TEST_GPU_ID + rank)
        self.device = device
        if isinstance(amp, str):
            self.amp_dtype = resolve_precision(amp, device=device)
        else:
            self.amp_dtype = resolve_precision(amp=bool(amp), device=device)
        # In the settings: False for fp32 (as before), else the dtype's name.
        self.amp = False if self.amp_dtype == torch.float32 else str(self.amp_dtype).split('.')[-1]
        self.gpu = device.index if device.type == 'cuda' else None
        self.ckpt_path, self.ckpt = resolve_checkpoint(cfg)
        self._model = None
        self.prepare_dataset()

    # -- setup ------------------------------------------------------------------------------
    def print_log(self, string):
        if self.verbose and self.rank == 0:
            tqdm.write(str(string))

    @property
    def model(self):
        if self._model is None:
            self._model = self._build_model()
        return self._model

    def _build_model(self):
        cfg = self.cfg
        if self.ckpt_path is None:
            self.print_log('Test evaluation: random weights (--ckpt_path test).')
            # The same seed in every process, so a multi-process run uses one set of weights.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TEST_CKPT_SEED)
                model = build_vos_model(cfg.MODEL_VOS, cfg)
        else:
            _, model, _ = load_vos_model(cfg.MODEL_ID, self.ckpt_path,
                                         device=self.device, cfg=cfg)
            self.print_log(f'Loaded checkpoint {self.ckpt_path}')
        model.set_channels_last(resolve_channels_last(cfg.TEST_CHANNELS_LAST, self.device))
        return model.to(self.device).eval()

    def prepare_dataset(self):
        cfg = self.cfg
        dataset, split = cfg.TEST_DATASET, cfg.TEST_DATASET_SPLIT
        if dataset not in DATASETS:
            raise ValueError(f'unknown test dataset {dataset!r} (known: {", ".join(DATASETS)})')
        transform = build_eval_transform(cfg)
        self.eval_name = eval_name(cfg, self.ckpt)
        self.dataset_root = os.path.join(cfg.DIR_EVALUATION, dataset)
        self.eval_dir = os.path.join(self.dataset_root, self.eval_name)
        self.progress_dir = os.path.join(self.eval_dir, PROGRESS_DIR)
        self.result_root_sparse = None
        self.zip_path = self.zip_path_sparse = None
        self.zip_prefix = 'Annotations'
        self.davis_root = None
        if dataset.startswith('youtubevos'):
            year = int(dataset[-4:])
            self.result_root = os.path.join(self.eval_dir, 'Annotations')
            self.zip_path = os.path.join(self.dataset_root, self.eval_name + '.zip')
            if split == 'val_all_frames':
                self.result_root_sparse = os.path.join(self.dataset_root,
                                                       self.eval_name + '_sparse', 'Annotations')
                self.zip_path_sparse = os.path.join(self.dataset_root,
                                                    self.eval_name + '_sparse.zip')
                self.dataset = YOUTUBEVOS_DenseTest(root=cfg.DIR_YTB, year=year, split='val',
                                                    transform=transform)
            elif split == 'val':
                self.dataset = YOUTUBEVOS_Test(root=cfg.DIR_YTB, year=year, split='val',
                                               transform=transform)
            else:
                raise ValueError(f'YouTube-VOS split must be val or val_all_frames, got {split!r}')
        elif dataset.startswith('davis'):
            if split not in ('val', 'test'):
                raise ValueError(f'DAVIS split must be val or test (test-dev), got {split!r}')
            resolution = 'Full-Resolution' if cfg.TEST_DATASET_FULL_RESOLUTION else '480p'
            self.result_root = os.path.join(self.eval_dir, 'Annotations', resolution)
            self.davis_root = cfg.DIR_DAVIS
            self.dataset = DAVIS_Test(split=[split], root=cfg.DIR_DAVIS, year=int(dataset[-4:]),
                                      transform=transform,
                                      full_resolution=cfg.TEST_DATASET_FULL_RESOLUTION)
            if split == 'test':
                # CodaLab's DAVIS server wants the sequence folders at the zip root.
                self.zip_path = os.path.join(self.dataset_root, self.eval_name + '.zip')
                self.zip_prefix = ''
        else:
            self.result_root = os.path.join(self.eval_dir, 'Annotations')
            self.dataset = CustomTest(root=cfg.DIR_DATA, transform=transform)
        self.seq_names = list(self.dataset.seqs)

    def settings(self):
        """What a finished sequence's results depend on; a change makes a resume redo it."""
        cfg = self.cfg
        ckpt = None
        if self.ckpt_path is not None:
            st = os.stat(self.ckpt_path)
            ckpt = [os.path.abspath(self.ckpt_path), st.st_size, st.st_mtime_ns]
        return {'model': cfg.MODEL_NAME, 'checkpoint': ckpt if ckpt else self.ckpt,
                'long_term_mem_gap': cfg.TEST_LONG_TERM_MEM_GAP,
                'short_term_mem_skip': cfg.TEST_SHORT_TERM_MEM_SKIP,
                'long_term_mem_max': cfg.TEST_LONG_TERM_MEM_MAX,
                'max_obj_num': cfg.MODEL_MAX_OBJ_NUM, 'lstt_num': cfg.MODEL_LSTT_NUM,
                'flip': bool(cfg.TEST_FLIP), 'multiscale': [float(s) for s in cfg.TEST_MULTISCALE],
                'max_short_edge': cfg.TEST_MAX_SHORT_EDGE, 'max_long_edge': cfg.TEST_MAX_LONG_EDGE,
                'use_prev_prob': bool(cfg.MODEL_USE_PREV_PROB), 'amp': self.amp}

    def folder_settings(self):
        """What the whole result folder was made with (``settings.json``): the sequence
        settings with the checkpoint identified by content, not by path or time."""
        ckpt = {'tag': self.ckpt}
        if self.ckpt_path is not None:
            if getattr(self, '_ckpt_sha', None) is None:
                self._ckpt_sha = file_sha256(self.ckpt_path)
            ckpt['sha256'] = self._ckpt_sha
        return json.loads(json.dumps(dict(
            self.settings(), checkpoint=ckpt, dataset=self.cfg.TEST_DATASET,
            split=self.cfg.TEST_DATASET_SPLIT, eval_name=self.eval_name)))

    def claim_result_folder(self, overwrite=False):
        """Make sure the result folder holds nothing made with other settings, then record
        this run's settings in it.

        An existing folder from other settings (another checkpoint content, flip, scales,
        memory settings...) raises ``ValueError`` unless ``overwrite``; with ``overwrite`` every
        sequence is recomputed (their completion markers are dropped) and the settings
        replaced. The same settings resume as before.
        """
        path = os.path.join(self.eval_dir, SETTINGS_FILE)
        mine = self.folder_settings()
        old = None
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {'unreadable': path}
        elif os.path.isdir(self.progress_dir):
            # A folder from before settings.json existed: judge it by its sequence markers.
            current = json.loads(json.dumps(self.settings()))
            for name in sorted(os.listdir(self.progress_dir)):
                try:
                    with open(os.path.join(self.progress_dir, name)) as f:
                        marker = json.load(f).get('settings')
                except (OSError, ValueError):
                    continue
                if marker != current:
                    old = {k: v for k, v in marker.items()} if isinstance(marker, dict) else {}
                    mine = current
                    break
        if old is not None and old != mine:
            if not overwrite:
                keys = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
                raise ValueError(
                    f'{self.eval_dir} holds results made with other settings (differing: '
                    f'{", ".join(keys)}); pass --overwrite to replace them, or another '
                    f'--result_path / --exp_name')
        if overwrite and os.path.isdir(self.progress_dir):
            for name in os.listdir(self.progress_dir):
                if name.endswith('.json'):
                    os.remove(os.path.join(self.progress_dir, name))
        atomic_write_json(path, self.folder_settings())

    # -- resume -----------------------------------------------------------------------------
    def _marker_path(self, seq_name):
        return os.path.join(self.progress_dir, seq_name + '.json')

    def read_marker(self, seq_name):
        """The finished-sequence record of ``seq_name`` if it is complete and current, else None."""
        path = self._marker_path(seq_name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        if record.get('settings') != json.loads(json.dumps(self.settings())):
            return None
        roots = {'dense': self.result_root, 'sparse': self.result_root_sparse}
        for kind, files in record.get('files', {}).items():
            if roots.get(kind) is None or not all(
                    os.path.isfile(os.path.join(roots[kind], rel)) for rel in files):
                return None
        return record

    def pending_sequences(self):
        """Indices of the sequences without a valid completion marker."""
        return [i for i, name in enumerate(self.seq_names) if self.read_marker(name) is None]

    # -- the evaluation loop ----------------------------------------------------------------
    def _new_engine(self):
        cfg = self.cfg
        engine = build_engine(cfg.MODEL_ENGINE, phase='eval', aot_model=self.model,
                              long_term_mem_gap=cfg.TEST_LONG_TERM_MEM_GAP,
                              short_term_mem_skip=cfg.TEST_SHORT_TERM_MEM_SKIP,
                              long_term_mem_max=cfg.TEST_LONG_TERM_MEM_MAX)
        engine.eval()
        return engine

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=bool(self.amp))

    def evaluating(self):
        """Evaluate every unfinished sequence (or those the queue hands out).

        Returns the run summary (single process) or this process's list of finished
        sequences (queue mode; the launcher finalises).
        """
        start = time.time()
        if self.seq_queue is None:
            todo = self.pending_sequences()
            skipped = [self.seq_names[i] for i in range(len(self.seq_names)) if i not in todo]
            if skipped:
                self.print_log(f'Resuming: {len(skipped)} of {len(self.seq_names)} sequences '
                               f'are finished and skipped.')
            indices = iter(todo)
            total = len(todo)
        else:
            indices = iter(self.seq_queue.get, 'END')
            total = None
        self.print_log(f'Eval {self.cfg.EXP_NAME} on {self.cfg.TEST_DATASET} '
                       f'{self.cfg.TEST_DATASET_SPLIT} -> {self.eval_dir}')
        done = []
        self.model.eval()
        engines = []
        bar = tqdm(indices, total=total, desc=f'eval[{self.rank}]', unit='seq',
                   position=self.rank, disable=None, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=2) as writer, torch.no_grad():
            for seq_idx in bar:
                record = self.evaluate_sequence(seq_idx, engines, writer)
                done.append(record['seq'])
                fps = record['fps']
                bar.set_postfix_str(f'{record["seq"]} {fps:.1f} fps' if fps else record['seq'])
        bar.close()
        if self.seq_queue is not None:
            return done
        return self.finalise(done, time.time() - start)

    def evaluate_sequence(self, seq_idx, engines, writer):
        """Run one sequence, write its PNGs and its completion marker; returns the marker."""
        cfg = self.cfg
        seq = self.dataset[seq_idx]
        seq_name = seq.seq_name
        for engine in engines:
            engine.restart_engine()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        # A half-finished sequence from an interrupted run is redone from scratch.
        if os.path.exists(self._marker_path(seq_name)):
            os.remove(self._marker_path(seq_name))
        sparse = set(getattr(seq, 'images_sparse', ())) if self.result_root_sparse else set()
        loader = DataLoader(seq, batch_size=None, shuffle=False, num_workers=self.workers,
                            pin_memory=self.device.type == 'cuda')
        timer = FrameTimer(self.device)
        futures, files = [], {'dense': []}
        if self.result_root_sparse:
            files['sparse'] = []

        def write(label, meta):
            """Queue ``label`` ((H, W) contiguous ids, CPU) for writing with original ids."""
            rel = os.path.join(seq_name, _stem(meta['current_name']) + '.png')
            targets = [('dense', self.result_root)]
            if meta['current_name'] in sparse:
                targets.append(('sparse', self.result_root_sparse))
            ids = _to_original_ids(label, meta['obj_idx'])
            for kind, root in targets:
                files[kind].append(rel)
                futures.append(writer.submit(save_mask, ids, os.path.join(root, rel)))
            while len(futures) > _MAX_PENDING_WRITES:
                futures.pop(0).result()

        frames = tqdm(loader, total=len(seq), desc=f'  {seq_name}', unit='frame', leave=False,
                      position=self.rank + 1 if self.seq_queue is None else self.rank,
                      disable=None, dynamic_ncols=True)
        obj_num = 0
        for frame_idx, samples in enumerate(frames):
            meta = samples[0]['meta']
            out_size = (int(meta['height']), int(meta['width']))
            obj_num = len(meta['obj_idx']) - 1
            while len(engines) < len(samples):
                engines.append(self._new_engine())
            imgs = [s['current_img'].to(self.device, non_blocking=True)[None] for s in samples]
            labels = [s['current_label'][None].to(self.device).float()
                      if 'current_label' in s else None for s in samples]
            flips = [bool(s['meta']['flip']) for s in samples]
            if frame_idx == 0:
                with self._autocast():
                    for engine, img, label in zip(engines, imgs, labels):
                        engine.add_reference_frame(img, _resize_nearest(label, img.shape[-2:]),
                                                   frame_step=0, obj_nums=[int(meta['obj_num'])])
                # The given annotation is the result of the reference frame.
                given = labels[flips.index(False)] if False in flips else labels[0].flip(-1)
                write(_resize_nearest(given, out_size)[0, 0].to(torch.uint8).cpu().numpy(), meta)
                continue
            timer.start()
            label = self.step(engines, imgs, labels, flips, out_size, frame_idx, obj_num)
            timer.stop()
            if cfg.TEST_FRAME_LOG:
                self.print_log(f'{seq_name} frame {_stem(meta["current_name"])}: {obj_num} '
                               f'objects, {timer.last() * 1e3:.0f} ms')
            write(label[0, 0].to(torch.uint8).cpu().numpy(), meta)
        frames.close()
        for future in futures:
            future.result()  # every PNG is on disk (or the error surfaces) before the marker

        seconds = timer.total()
        n_timed = len(timer.spans)
        record = {
            'seq': seq_name, 'frames': len(seq), 'timed_frames': n_timed, 'objects': obj_num,
            'seconds': seconds, 'fps': n_timed / seconds if n_timed and seconds > 0 else None,
            'max_mem_gib': (peak_memory_mb(self.device) or 0.) / 1024,
            'mem_kind': 'cuda_max_allocated' if self.device.type == 'cuda' else 'cpu_peak_rss',
            'device': str(self.device), 'rank': self.rank, 'finished_at': time.time(),
            'files': files, 'settings': self.settings(),
        }
        atomic_write_json(self._marker_path(seq_name), record)
        if self.verbose:
            fps = f'{record["fps"]:.2f}' if record['fps'] else 'n/a'
            tqdm.write(f'[{self.rank}] {seq_name}: {n_timed} frames, {obj_num} objects, '
                       f'FPS {fps}, max mem {record["max_mem_gib"]:.2f} GiB')
        return record

    def step(self, engines, imgs, labels, flips, out_size, frame_idx, obj_num):
        """Propagate one frame through every augmentation's engine and update their memory.

        Args:
            engines: one inference engine per augmentation.
            imgs: per augmentation ``(1, 3, h_a, w_a)`` network inputs.
            labels: per augmentation ``(1, 1, H, W)`` given annotation (contiguous ids, at the
                label's resolution, flipped for flipped augmentations) or None.
            flips: per augmentation, whether its input is mirrored.
            out_size: ``(H_out, W_out)`` the result is written at.
            obj_num: objects known after this frame (``len(obj_idx) - 1``).
        Returns:
            ``(1, 1, H_out, W_out)`` float label of the ensemble.
        """
        cfg = self.cfg
        probs = []
        # Labels need only the channels of live objects (bit-identical labels, ~5x less
        # resizing and softmax at 480p: resize_logits); memory written from probabilities
        # (MODEL_USE_PREV_PROB) takes every ID channel, as upstream.
        live_only = not cfg.MODEL_USE_PREV_PROB
        with self._autocast():
            for engine, img, flipped in zip(engines, imgs, flips):
                engine.match_propogate_one_frame(img)
                logits = engine.decode_current_logits(out_size, live_only=live_only)
                if flipped:  # back to the frame's orientation before the softmax
                    logits = logits.flip(-1)
                probs.append(torch.softmax(logits.float(), dim=1))
        given = next((lab for lab, f in zip(labels, flips) if lab is not None and not f), None)
        if given is None and any(lab is not None for lab in labels):
            given = next(lab for lab in labels if lab is not None).flip(-1)

        aug_labels = [channel_argmax(p, keepdim=True).float() for p in probs]
        if len(probs) == 1:  # the mean of one is itself: no second argmax
            pred_label = aug_labels[0]
        else:
            pred_label = channel_argmax(torch.stack(probs).mean(0), keepdim=True).float()

        def own_view(x, flipped, engine):
            return _resize_nearest(x.flip(-1) if flipped else x, engine.input_size_2d)

        with self._autocast():
            if given is not None:
                # Objects given at this frame (new ones, or re-annotated ones) replace the
                # prediction where they are; every engine re-references the frame.
                given = _resize_nearest(given, out_size)
                keep = given == 0
                pred_label = torch.where(keep, pred_label, given)
                aug_labels = [torch.where(keep, lab, given) for lab in aug_labels]
                new_obj_nums = [obj_num]  # upstream: max(pred_label), which can drop an object
                for engine, img, lab, flipped in zip(engines, imgs, aug_labels, flips):
                    lab = own_view(lab, flipped, engine)
                    engine.add_reference_frame(img, lab, obj_nums=new_obj_nums,
                                               frame_step=frame_idx)
                    engine.decode_current_logits()  # upstream resizes it and discards it
                    engine.update_memory(lab)
            elif cfg.MODEL_USE_PREV_PROB:
                for engine, prob, flipped in zip(engines, probs, flips):
                    engine.update_memory(own_view(prob, flipped, engine))
            else:
                for engine, lab, flipped in zip(engines, aug_labels, flips):
                    engine.update_memory(own_view(lab, flipped, engine))
        return pred_label

    # -- end of run -------------------------------------------------------------------------
    def finalise(self, computed=(), seconds=None):
        """After every writer has finished: timing file, zip(s), DAVIS scores.

        Args:
            computed: sequences processed in this run (the others were resumed).
            seconds: wall time of this run.
        Returns:
            dict with ``eval_dir``, ``result_root``, ``zip``, ``timing`` and ``scores``.
        """
        records, missing = {}, []
        for name in self.seq_names:
            record = self.read_marker(name)
            if record is None:
                missing.append(name)
            else:
                records[name] = record
        if missing:
            more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
            raise RuntimeError(f'{self.eval_dir}: {len(missing)} sequence(s) unfinished '
                               f'({", ".join(missing[:5])}{more}); run again to resume')
        timing = self._timing(records, computed, seconds)
        atomic_write_json(os.path.join(self.eval_dir, TIMING_FILE), timing)
        summary = {'eval_dir': self.eval_dir, 'result_root': self.result_root,
                   'timing': timing, 'zip': None, 'zip_sparse': None, 'scores': None}
        if self.zip_path:
            summary['zip'] = self._zip(records, 'dense', self.result_root, self.zip_path)
        if self.zip_path_sparse:
            summary['zip_sparse'] = self._zip(records, 'sparse', self.result_root_sparse,
                                              self.zip_path_sparse)
        if self._davis_gt_complete():
            summary['scores'] = self._score_davis()
        overall = timing['overall']
        self.print_log('All-Frame FPS: {}, All-Seq FPS: {}, Max Mem: {:.2f} GiB'.format(
            *(f'{v:.2f}' if v else 'n/a' for v in (overall['all_frame_fps'],
                                                  overall['all_seq_fps'])),
            overall['max_mem_gib']))
        return summary

    def _timing(self, records, computed, seconds):
        computed = set(computed)
        seqs = {}
        for name, r in records.items():
            seqs[name] = {k: r[k] for k in ('frames', 'timed_frames', 'objects', 'seconds',
                                            'fps', 'max_mem_gib', 'mem_kind', 'device', 'rank')}
            seqs[name]['resumed'] = name not in computed

        def summarise(names):
            timed = [seqs[n] for n in names if seqs[n]['timed_frames']]
            frames = sum(s['timed_frames'] for s in timed)
            secs = sum(s['seconds'] for s in timed)
            per_frame = [s['seconds'] / s['timed_frames'] for s in timed]
            mean = float(np.mean(per_frame)) if per_frame else 0.0
            return {'sequences': len(names), 'timed_frames': frames, 'seconds': secs,
                    'all_frame_fps': frames / secs if secs > 0 else None,
                    'all_seq_fps': 1.0 / mean if mean > 0 else None,
                    'max_mem_gib': max((seqs[n]['max_mem_gib'] for n in names), default=0.0)}

        this_run = summarise([n for n in seqs if n in computed])
        this_run.update({'computed_sequences': [n for n in self.seq_names if n in computed],
                         'skipped_sequences': [n for n in self.seq_names if n not in computed],
                         'wall_seconds': seconds, 'gpu_num': int(self.cfg.TEST_GPU_NUM)})
        return {'eval_name': self.eval_name, 'amp': self.amp,
                'note': 'frames after the reference frame, network time only (CUDA events '
                        'on GPU, wall time on CPU); memory: peak allocated on GPU, peak RSS '
                        'of the process on CPU',
                'overall': summarise(list(seqs)), 'this_run': this_run, 'sequences': seqs}

    def _zip(self, records, kind, root, zip_path):
        members = []
        for name in self.seq_names:
            for rel in sorted(records[name]['files'][kind]):
                arc = rel.replace(os.sep, '/')
                members.append((os.path.join(root, rel),
                                f'{self.zip_prefix}/{arc}' if self.zip_prefix else arc))
        write_zip(zip_path, members)
        self.print_log(f'Saved {len(members)} masks to {zip_path}')
        return zip_path

    def _davis_gt_complete(self):
        """True for a DAVIS val run whose ground truth annotates every frame."""
        if self.davis_root is None or self.cfg.TEST_DATASET_SPLIT == 'test':
            return False
        gt_root = os.path.join(self.davis_root, 'Annotations', '480p')
        for name in self.seq_names:
            gt_dir = os.path.join(gt_root, name)
            img_dir = os.path.join(self.dataset.image_root, name)
            if not os.path.isdir(gt_dir):
                return False
            gts = {_stem(n) for n in os.listdir(gt_dir) if n.endswith('.png')}
            frames = {_stem(n) for n in os.listdir(img_dir)
                      if n.lower().endswith(('.jpg', '.jpeg', '.png'))}
            if not frames <= gts:
                return False
        return True

    def _score_davis(self):
        year = int(self.cfg.TEST_DATASET[-4:])
        set_name = self.cfg.TEST_DATASET_SPLIT
        json_path = os.path.join(self.eval_dir, f'jf_scores-{set_name}.json')
        scores = evaluate_davis(self.davis_root, self.result_root, task='semi-supervised',
                                set=set_name, year=year, workers=max(1, self.workers),
                                json_path=json_path, write_csv=True)
        g = scores['global']
        self.print_log(f'DAVIS {year} {set_name}: J&F {g["J&F-Mean"]:.4f}, J {g["J-Mean"]:.4f}, '
                       f'F {g["F-Mean"]:.4f} -> {json_path}')
        return scores['global']


# ------------------------------------------------------------------------------------------
# Launching (one or several processes)
# ------------------------------------------------------------------------------------------

def _eval_worker(rank, cfg, device, amp, workers, seq_queue, threads):
    if threads:
        torch.set_num_threads(threads)
    evaluator = Evaluator(cfg, rank=rank, seq_queue=seq_queue, device=device, amp=amp,
                          workers=workers)
    evaluator.evaluating()


def run_evaluation(cfg, device=None, amp=False, workers=None, verbose=True, overwrite=False):
    """Evaluate with ``cfg.TEST_GPU_NUM`` processes and finalise; returns the run summary.

    A result folder made with other settings is refused unless ``overwrite``
    (:meth:`Evaluator.claim_result_folder`).

    Several processes pull sequence indices from one queue (one GPU each on CUDA; on the CPU
    the threads are split between them). The zip and scores are made after all have exited.
    """
    gpu_num = max(1, int(cfg.TEST_GPU_NUM))
    evaluator = Evaluator(cfg, rank=0, device=device, amp=amp, workers=workers,
                          verbose=verbose)
    evaluator.claim_result_folder(overwrite)
    if gpu_num == 1:
        return evaluator.evaluating()
    import torch.multiprocessing as mp
    start = time.time()
    todo = evaluator.pending_sequences()
    computed = [evaluator.seq_names[i] for i in todo]
    if todo:
        nprocs = min(gpu_num, len(todo))
        ctx = mp.get_context('spawn')
        seq_queue = ctx.Queue()
        for idx in todo:
            seq_queue.put(idx)
        for _ in range(nprocs):
            seq_queue.put('END')
        dev = evaluator.device
        threads = max(1, torch.get_num_threads() // nprocs) if dev.type == 'cpu' else None
        dev_arg = 'cpu' if dev.type == 'cpu' else 'cuda'
        mp.spawn(_eval_worker, args=(cfg, dev_arg, amp, workers, seq_queue, threads),
                 nprocs=nprocs, join=True)
    return evaluator.finalise(computed, time.time() - start)
