"""DAVIS J&F metrics, computed exactly as the official toolkits do.

The reference is the DAVIS 2017 toolkit
(``davisvideochallenge/davis2017-evaluation``); DAVIS 2016 uses the same formulas on binary masks.

Per frame and object (all masks are ``(H, W)`` bool):

- J (region similarity): ``|gt & pr & ~void| / |(gt | pr) & ~void|``, 1 when the union is empty.
- F (boundary F-measure): precision/recall between the one-pixel boundary maps of ``pr`` and ``gt``
  (David Martin's ``seg2bmap`` rules), each matched against the other dilated by a disk of radius
  ``ceil(0.008 * diagonal)``; no one-to-one matching.

Per object, over its per-frame vector: Mean, Recall (fraction > 0.5) and Decay (first quarter minus
last quarter, MATLAB-rounded, end-inclusive bins). Global numbers average over all objects of all
sequences; ``J&F-Mean = (J-Mean + F-Mean) / 2``.

Protocols:

- semi-supervised: GT ``Annotations/480p``; the first and last frame are not scored; objects are
  ``1..K`` with ``K = max id of the first GT frame``; a predicted id above K is an error.
- unsupervised: GT ``Annotations_unsupervised/480p``; all frames, void (255) pixels excluded; up to
  20 proposals matched one-to-one to GT objects by the Hungarian algorithm on mean (J + F) / 2.
- DAVIS 2016 (``binary=True``): GT and predictions binarised (any non-zero pixel is the object),
  then scored as semi-supervised with one object per sequence.

Known and intended difference to the toolkit: its Decay casts the bin indices to uint8, so videos
with 256+ scored frames get a NaN Decay; here the indices are exact for any length.

Evaluating a set splits every sequence into chunks of frames that worker processes score
independently; the numbers are the same for any number of workers.
"""
import glob
import math
import os
from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import cv2
import numpy as np

from utils.image import load_mask_array
from utils.io import atomic_write_json, atomic_write_text

VOID_LABEL = 255
BOUND_TH = 0.008
MAX_PROPOSALS = 20
TASKS = ('semi-supervised', 'unsupervised')
GLOBAL_COLUMNS = ('J&F-Mean', 'J-Mean', 'J-Recall', 'J-Decay', 'F-Mean', 'F-Recall', 'F-Decay')
# Frames per work item: small enough to balance 2+ workers on DAVIS' 50-100 frame videos,
# large enough that the pickling overhead stays negligible.
_CHUNK_FRAMES = 8


# --------------------------------------------------------------------------------------------
# Per-frame metrics
# --------------------------------------------------------------------------------------------

def boundary_radius(height, width, bound_th=BOUND_TH):
    """Dilation radius in pixels: ``bound_th`` itself when >= 1, else ``ceil(bound_th * diagonal)``."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.sqrt(height * height + width * width)))


def disk(radius):
    """``(2r+1, 2r+1)`` uint8 structuring element ``{(dy, dx): dy^2 + dx^2 <= r^2}``."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius).astype(np.uint8)


def boundary_map(mask):
    """One-pixel boundary of a binary mask, ``(..., H, W)`` -> ``(..., H, W)`` bool.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour.
    The last row compares only with the east neighbour, the last column only with the south one,
    and the bottom-right pixel is never a boundary; hence the image border is never a boundary and
    boundaries sit half a pixel towards the origin (Martin's ``seg2bmap`` at full resolution).
    """
    m = np.asarray(mask, dtype=bool)
    b = np.zeros_like(m)
    core = m[..., :-1, :-1]
    b[..., :-1, :-1] = (core != m[..., :-1, 1:]) | (core != m[..., 1:, :-1]) | (core != m[..., 1:, 1:])
    b[..., -1, :-1] = m[..., -1, :-1] != m[..., -1, 1:]
    b[..., :-1, -1] = m[..., :-1, -1] != m[..., 1:, -1]
    return b


def _box(mask):
    """Bounding box ``(y0, y1, x0, x1)`` (end-exclusive) of the true pixels, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class _Boundary:
    """Boundary map of one ``(H, W)`` mask and its disk dilation, stored only around the object.

    Exactness of the crops:
    - boundary pixels lie within the mask's box grown by one pixel towards the origin, and their
      values only depend on pixels up to one further row/column; the crop keeps one zero row and
      column after the mask (or ends at the image border, where the border rules of
      ``boundary_map`` are the true ones), so ``boundary_map`` of the crop equals the full one;
    - the dilation of the boundary lies within its box grown by the radius, so dilating that
      crop loses nothing (pixels outside the image never count, as with OpenCV's default border).
    """

    __slots__ = ('bmap', 'count', 'box', 'dilated', 'dil_box')

    def __init__(self, mask, kernel):
        self.count, self.bmap, self.box, self.dilated, self.dil_box = 0, None, None, None, None
        mbox = _box(mask)
        if mbox is None:
            return
        h, w = mask.shape
        y0, x0 = max(mbox[0] - 1, 0), max(mbox[2] - 1, 0)
        y1, x1 = min(mbox[1] + 1, h), min(mbox[3] + 1, w)
        bmap = boundary_map(mask[y0:y1, x0:x1])
        bbox = _box(bmap)
        if bbox is None:  # e.g. a full-frame mask: the image border is never a boundary
            return
        self.bmap = bmap[bbox[0]:bbox[1], bbox[2]:bbox[3]]
        self.count = int(np.count_nonzero(self.bmap))
        by0, by1, bx0, bx1 = bbox[0] + y0, bbox[1] + y0, bbox[2] + x0, bbox[3] + x0
        self.box = (by0, by1, bx0, bx1)
        r = kernel.shape[0] // 2
        dy0, dx0 = max(by0 - r, 0), max(bx0 - r, 0)
        dy1, dx1 = min(by1 + r, h), min(bx1 + r, w)
        canvas = np.zeros((dy1 - dy0, dx1 - dx0), np.uint8)
        canvas[by0 - dy0:by1 - dy0, bx0 - dx0:bx1 - dx0] = self.bmap
        self.dilated = cv2.dilate(canvas, kernel).view(bool)
        self.dil_box = (dy0, dy1, dx0, dx1)

    def hits(self, other):
        """Number of this boundary's pixels that lie inside ``other``'s dilation."""
        if self.count == 0 or other.count == 0:
            return 0
        by0, by1, bx0, bx1 = self.box
        dy0, dy1, dx0, dx1 = other.dil_box
        y0, y1, x0, x1 = max(by0, dy0), min(by1, dy1), max(bx0, dx0), min(bx1, dx1)
        if y0 >= y1 or x0 >= x1:
            return 0
        mine = self.bmap[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
        theirs = other.dilated[y0 - dy0:y1 - dy0, x0 - dx0:x1 - dx0]
        return int(np.count_nonzero(mine & theirs))


def _boundaries(masks, kernel):
    """``(N, H, W)`` bool masks -> list of N ``_Boundary``."""
    return [_Boundary(m, kernel) for m in masks]


def _one_hot(label, n):
    """``(H, W)`` ids -> ``(n, H, W)`` bool masks of ids ``1..n``, compared in the label's dtype."""
    dtype = label.dtype if n <= np.iinfo(label.dtype).max else np.int64
    return label[None] == np.arange(1, n + 1, dtype=dtype)[:, None, None]


def _f_from_counts(pred_b, gt_b):
    """Boundary F-measure of one (prediction, GT) pair of ``_Boundary``, toolkit case table."""
    n_pred, n_gt = pred_b.count, gt_b.count
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0 and the other is 1
    precision = pred_b.hits(gt_b) / float(n_pred)
    recall = gt_b.hits(pred_b) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _j_from_counts(inter, union):
    """J from integer counts (any shape); an empty union scores 1."""
    inter = np.asarray(inter, dtype=np.int64)
    union = np.asarray(union, dtype=np.int64)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def region_similarity(gt, pred, void=None):
    """J of binary masks ``(..., H, W)``; returns a float for 2D input, else an array ``(...)``."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f'ground truth {gt.shape} and prediction {pred.shape} differ in shape')
    keep = True if void is None else ~np.broadcast_to(np.asarray(void, dtype=bool), gt.shape)
    inter = np.count_nonzero(gt & pred & keep, axis=(-2, -1))
    union = np.count_nonzero((gt | pred) & keep, axis=(-2, -1))
    j = _j_from_counts(inter, union)
    return float(j) if j.ndim == 0 else j


def boundary_f_measure(gt, pred, void=None, bound_th=BOUND_TH):
    """F of binary masks ``(..., H, W)``; float for 2D input, else an array ``(...)``.

    Void pixels are removed from both masks before their boundaries are extracted.
    """
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f'ground truth {gt.shape} and prediction {pred.shape} differ in shape')
    if void is not None:
        keep = ~np.broadcast_to(np.asarray(void, dtype=bool), gt.shape)
        gt, pred = gt & keep, pred & keep
    h, w = gt.shape[-2:]
    kernel = disk(boundary_radius(h, w, bound_th))
    lead = gt.shape[:-2]
    gt_b = _boundaries(gt.reshape(-1, h, w), kernel)
    pred_b = _boundaries(pred.reshape(-1, h, w), kernel)
    f = np.array([_f_from_counts(p, g) for p, g in zip(pred_b, gt_b)], dtype=np.float64)
    return float(f[0]) if not lead else f.reshape(lead)


# --------------------------------------------------------------------------------------------
# Per-object statistics
# --------------------------------------------------------------------------------------------

def decay_bin_ids(n):
    """Start/end frame indices of the 4 Decay quadrants: MATLAB ``round(linspace(1, n, 5)) - 1``."""
    return (np.round(np.linspace(1, n, 5) + 1e-10) - 1).astype(np.int64)


def object_statistics(values):
    """``(mean, recall, decay)`` of one object's per-frame J or F vector ``(T,)``.

    Recall counts frames strictly above 0.5. Decay is the mean of the first quadrant minus the
    mean of the last; quadrant i spans frames ``ids[i] .. ids[i+1]`` inclusive, so they overlap.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float('nan'), float('nan'), float('nan')
    mean = np.nanmean(v)
    recall = np.nanmean(v > 0.5)
    ids = decay_bin_ids(len(v))
    decay = np.nanmean(v[ids[0]:ids[1] + 1]) - np.nanmean(v[ids[3]:ids[4] + 1])
    return float(mean), float(recall), float(decay)


# --------------------------------------------------------------------------------------------
# Reading masks
# --------------------------------------------------------------------------------------------

def read_label_png(path):
    """Single-channel label PNG -> ``(H, W)`` integer array of ids (palette indices or gray values).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, unreadable,
    multi-channel (RGB masks carry colours, not ids) or not integer-valued.
    """
    mode, arr = load_mask_array(path)
    if arr.ndim != 2:
        raise ValueError(f'mask {path} has mode {mode!r} with shape {arr.shape}; expected a '
                         f'single-channel indexed (P) or grayscale (L) PNG whose values are object ids')
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    elif arr.dtype.kind not in 'ui':
        raise ValueError(f'mask {path} has non-integer pixel type {arr.dtype} (mode {mode!r})')
    elif arr.dtype.kind == 'i' and arr.size and arr.min() < 0:
        raise ValueError(f'mask {path} has negative ids')
    return arr


def _read_gt(path, binary, use_void):
    """GT label map with void handled: ``(labels (H, W), void (H, W) bool or None)``."""
    gt = read_label_png(path)
    if binary:
        return (gt != 0).view(np.uint8), None
    void = gt == VOID_LABEL
    if not void.any():
        return gt, None
    gt = np.where(void, 0, gt).astype(gt.dtype)
    return gt, (void if use_void else None)


def _read_pred(path, gt_shape, gt_path, binary):
    pred = read_label_png(path)
    if pred.shape != gt_shape:
        raise ValueError(f'result {path} is {pred.shape[1]}x{pred.shape[0]} (WxH) but the ground '
                         f'truth {gt_path} is {gt_shape[1]}x{gt_shape[0]}; results must have the '
                         f'ground-truth size')
    return (pred != 0).view(np.uint8) if binary else pred


# --------------------------------------------------------------------------------------------
# Scoring chunks of frames (runs in worker processes)
# --------------------------------------------------------------------------------------------

def _semi_frame(gt, pred, n_obj, kernel):
    """Per-object J and F of one frame, objects ``1..n_obj``: two ``(n_obj,)`` arrays."""
    gt_m, pred_m = _one_hot(gt, n_obj), _one_hot(pred, n_obj)
    j = _j_from_counts(np.count_nonzero(gt_m & pred_m, axis=(1, 2)),
                       np.count_nonzero(gt_m | pred_m, axis=(1, 2)))
    f = [_f_from_counts(p, g) for p, g in zip(_boundaries(pred_m, kernel), _boundaries(gt_m, kernel))]
    return j, np.array(f, dtype=np.float64)


def _unsup_frame(gt, pred, void, n_obj, n_prop, kernel):
    """All (proposal, object) pairs of one frame.

    Returns J and F ``(n_prop + 1, n_obj)``; row 0 scores an empty proposal (used to pad videos
    whose proposals are fewer than the GT objects), row q proposal q.
    """
    keep = np.ones(gt.shape, bool) if void is None else ~void
    # Pixel counts for every (proposal, object) pair in one pass; ids above n_obj are not
    # objects (K comes from the first frame), so they count as background.
    gt_ids = np.where(gt <= n_obj, gt, 0).astype(np.intp)[keep]
    pair_ids = pred.astype(np.intp)[keep] * (n_obj + 1) + gt_ids
    counts = np.bincount(pair_ids, minlength=(n_prop + 1) * (n_obj + 1)).reshape(n_prop + 1, n_obj + 1)
    inter = counts[1:, 1:]
    pred_area, gt_area = counts[1:].sum(axis=1), counts[:, 1:].sum(axis=0)
    j = np.empty((n_prop + 1, n_obj))
    j[0] = _j_from_counts(0, gt_area)
    j[1:] = _j_from_counts(inter, pred_area[:, None] + gt_area[None, :] - inter)

    gt_b = _boundaries(_one_hot(gt, n_obj) & keep, kernel)
    pred_b = _boundaries(_one_hot(pred, n_prop) & keep, kernel)
    f = np.empty((n_prop + 1, n_obj))
    f[0] = [1.0 if g.count == 0 else 0.0 for g in gt_b]
    for q, p in enumerate(pred_b, start=1):
        f[q] = [_f_from_counts(p, g) for g in gt_b]
    return j, f


def _score_chunk(job):
    """Worker: score the frames of one chunk.

    ``job``: dict with ``task``, ``binary``, ``gt_paths``, ``pred_paths``, ``n_obj``, ``bound_th``.
    Returns a dict with per-frame arrays (frames last) and the max predicted id of each frame.
    """
    task, binary, n_obj = job['task'], job['binary'], job['n_obj']
    unsup = task == 'unsupervised'
    j_frames, f_frames, max_ids = [], [], []
    for gt_path, pred_path in zip(job['gt_paths'], job['pred_paths']):
        gt, void = _read_gt(gt_path, binary, use_void=unsup)
        pred = _read_pred(pred_path, gt.shape, gt_path, binary)
        # The radius follows each frame's own size (DAVIS val has 854, 910 and 1152 px widths).
        kernel = disk(boundary_radius(*gt.shape, job['bound_th']))
        max_id = int(pred.max()) if pred.size else 0
        max_ids.append(max_id)
        if unsup:
            if max_id > MAX_PROPOSALS:
                raise ValueError(f'result {pred_path} has proposal id {max_id}; the unsupervised '
                                 f'protocol allows at most {MAX_PROPOSALS} proposals per video')
            j, f = _unsup_frame(gt, pred, void, n_obj, max_id, kernel)
        else:
            if max_id > n_obj:
                # Reported by the caller, which names the sequence; skip the useless scoring.
                j = f = np.zeros(n_obj)
            else:
                j, f = _semi_frame(gt, pred, n_obj, kernel)
        j_frames.append(j)
        f_frames.append(f)
    return {'j': j_frames, 'f': f_frames, 'max_ids': max_ids}


def _init_worker():
    # Each worker is one of `workers` processes; OpenCV's own threads would oversubscribe cores.
    cv2.setNumThreads(1)


def _run_jobs(jobs, workers):
    """Run ``_score_chunk`` over jobs in order; in-process when ``workers <= 1``."""
    if workers <= 1 or len(jobs) <= 1:
        return [_score_chunk(job) for job in jobs]
    # 'spawn', not 'fork': a child forked while the parent's OpenCV or torch thread pools
    # hold locks can deadlock (seen in the test suite after cv2 had been used). Spawned
    # workers import this module afresh; a calling script needs the usual
    # ``if __name__ == '__main__':`` guard, as every tool here has.
    ctx = multiprocessing.get_context('spawn')
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                             initializer=_init_worker) as pool:
        return list(pool.map(_score_chunk, jobs))


# --------------------------------------------------------------------------------------------
# Dataset layout
# --------------------------------------------------------------------------------------------

def _read_lines(path):
    with open(path) as fh:
        return [line.strip() for line in fh if line.strip()]


def sequence_list(davis_path, set_name='val', task='semi-supervised', year=2017):
    """Sequence names of a set, in file order.

    2017: ``ImageSets/2017/<set>.txt`` (unsupervised test-dev / test-challenge: ``ImageSets/2019``).
    2016: ``ImageSets/2016/<set>.txt`` (2017 trainval release) or, as the DAVIS-2016 package ships
    it, ``ImageSets/480p/<set>.txt`` whose lines are ``/JPEGImages/480p/<seq>/<frame>.jpg ...``.
    """
    if int(year) == 2016:
        candidates = [os.path.join(davis_path, 'ImageSets', '2016', f'{set_name}.txt'),
                      os.path.join(davis_path, 'ImageSets', '480p', f'{set_name}.txt')]
    else:
        sub = '2019' if task == 'unsupervised' and set_name in ('test-dev', 'test-challenge') else '2017'
        candidates = [os.path.join(davis_path, 'ImageSets', sub, f'{set_name}.txt')]
    for path in candidates:
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f'sequence list for set {set_name!r} not found; looked for '
                                + ' and '.join(candidates))
    names = []
    for line in _read_lines(path):
        first = line.split()[0]
        # Frame-list format: take the folder of the first path of the line.
        name = first.strip('/').split('/')[-2] if '/' in first else first
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f'sequence list {path} is empty')
    return names


def annotation_dir(davis_path, task='semi-supervised'):
    folder = 'Annotations' if task == 'semi-supervised' else 'Annotations_unsupervised'
    return os.path.join(davis_path, folder, '480p')


def _gt_frames(davis_path, seq, task):
    seq_dir = os.path.join(annotation_dir(davis_path, task), seq)
    paths = sorted(glob.glob(os.path.join(glob.escape(seq_dir), '*.png')))
    if not paths:
        raise FileNotFoundError(f'no ground-truth PNGs in {seq_dir}')
    return paths


def _frame_id(path):
    return os.path.splitext(os.path.basename(path))[0]


# --------------------------------------------------------------------------------------------
# Evaluating a set
# --------------------------------------------------------------------------------------------

def _plan_sequence(davis_path, results_path, seq, task, binary):
    """GT/result paths of the scored frames and the object count K of one sequence."""
    gt_paths = _gt_frames(davis_path, seq, task)
    first_gt, _ = _read_gt(gt_paths[0], binary, use_void=False)
    n_obj = int(first_gt.max()) if first_gt.size else 0
    if task == 'semi-supervised':
        if len(gt_paths) < 3:
            raise ValueError(f'{os.path.dirname(gt_paths[0])} has {len(gt_paths)} annotated frames; '
                             f'the semi-supervised protocol scores frames 1..N-2 and needs N >= 3')
        gt_paths = gt_paths[1:-1]
    pred_paths = [os.path.join(results_path, seq, _frame_id(p) + '.png') for p in gt_paths]
    missing = [p for p in pred_paths if not os.path.isfile(p)]
    if missing:
        more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
        raise FileNotFoundError(f'result mask not found: {missing[0]}{more}; sequence {seq} needs '
                                f'one PNG per scored ground-truth frame, named like the GT')
    return {'seq': seq, 'gt_paths': gt_paths, 'pred_paths': pred_paths, 'n_obj': n_obj}


def _assemble_semi(plan, chunks):
    seq, n_obj = plan['seq'], plan['n_obj']
    max_ids = [m for c in chunks for m in c['max_ids']]
    worst = int(np.argmax(max_ids))
    if max_ids[worst] > n_obj:
        raise ValueError(f'result {plan["pred_paths"][worst]} contains object id {max_ids[worst]} '
                         f'but sequence {seq} has {n_obj} object(s) (max id of its first GT frame)')
    j = np.stack([x for c in chunks for x in c['j']], axis=1)  # (K, T)
    f = np.stack([x for c in chunks for x in c['f']], axis=1)
    pairs = [(k, k) for k in range(1, n_obj + 1)]
    return j, f, pairs


def _assemble_unsup(plan, chunks):
    from scipy.optimize import linear_sum_assignment  # scipy comes with scikit-image

    n_obj = plan['n_obj']
    frames = [(jf, ff) for c in chunks for jf, ff in zip(c['j'], c['f'])]
    n_prop = max(max(c['max_ids']) for c in chunks)
    n_rows = max(n_prop, n_obj)  # fewer proposals than objects: pad with empty ones
    j = np.zeros((n_rows, n_obj, len(frames)))
    f = np.zeros((n_rows, n_obj, len(frames)))
    for t, (jf, ff) in enumerate(frames):
        # A proposal absent from this frame scores like the empty proposal (row 0).
        rows = np.arange(1, n_rows + 1)
        rows[rows >= jf.shape[0]] = 0
        j[:, :, t], f[:, :, t] = jf[rows], ff[rows]
    score = (np.mean(j, axis=2) + np.mean(f, axis=2)) / 2
    prop_idx, obj_idx = linear_sum_assignment(-score)
    pairs = [(int(q) + 1, int(k) + 1) for q, k in zip(prop_idx, obj_idx)]
    return j[prop_idx, obj_idx], f[prop_idx, obj_idx], pairs


def _chunk_jobs(plan, task, binary, bound_th):
    n = len(plan['gt_paths'])
    return [{'task': task, 'binary': binary, 'n_obj': plan['n_obj'], 'bound_th': bound_th,
             'gt_paths': plan['gt_paths'][s:s + _CHUNK_FRAMES],
             'pred_paths': plan['pred_paths'][s:s + _CHUNK_FRAMES]}
            for s in range(0, n, _CHUNK_FRAMES)]


def default_workers():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def evaluate_dataset(davis_path, results_path, task='semi-supervised', set_name='val', year=2017,
                     workers=None, sequences=None, bound_th=BOUND_TH):
    """Score a results folder against DAVIS ground truth; returns plain Python data.

    Args:
        davis_path: DAVIS root holding ``ImageSets``, ``Annotations[_unsupervised]/480p``.
        results_path: folder with ``<seq>/<frame>.png`` label maps.
        task: 'semi-supervised' or 'unsupervised'.
        set_name: image set, e.g. 'val'.
        year: 2017 (multi-object) or 2016 (binary masks, semi-supervised only).
        workers: processes to use (default: all available cores; 1 = in-process).
        sequences: optional explicit list of sequence names instead of the image set.

    Returns:
        ``{'global': {column: value}, 'per_object': {'<seq>_<k>': {...}}, 'sequences': [...],
        'task', 'set', 'year'}``; each per-object entry has J/F Mean, Recall, Decay, the scored
        ``frames`` and ``J-per-frame`` / ``F-per-frame`` (unsupervised: also
        ``matched_proposal_id`` and ``matched_gt_object_id``; ``<k>`` is then the position in
        proposal order, as in the toolkit, not the GT id).
    """
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    year = int(year)
    if year not in (2016, 2017):
        raise ValueError(f'year must be 2016 or 2017, got {year}')
    binary = year == 2016
    if binary and task != 'semi-supervised':
        raise ValueError('DAVIS 2016 (binary masks) is evaluated with the semi-supervised protocol only')
    if not os.path.isdir(davis_path):
        raise FileNotFoundError(f'DAVIS root not found: {davis_path}')
    if not os.path.isdir(results_path):
        raise FileNotFoundError(f'results folder not found: {results_path}')
    if sequences is None:
        sequences = sequence_list(davis_path, set_name, task, year)
    workers = default_workers() if workers is None else max(1, int(workers))

    plans = [_plan_sequence(davis_path, results_path, seq, task, binary) for seq in sequences]
    jobs, owner = [], []
    for i, plan in enumerate(plans):
        seq_jobs = _chunk_jobs(plan, task, binary, bound_th)
        jobs.extend(seq_jobs)
        owner.extend([i] * len(seq_jobs))
    outputs = _run_jobs(jobs, workers)

    per_object = {}
    stats = {name: [] for name in ('JM', 'JR', 'JD', 'FM', 'FR', 'FD')}
    for i, plan in enumerate(plans):
        chunks = [out for out, o in zip(outputs, owner) if o == i]
        assemble = _assemble_unsup if task == 'unsupervised' else _assemble_semi
        j, f, pairs = assemble(plan, chunks)
        frames = [_frame_id(p) for p in plan['gt_paths']]
        for idx, (prop_id, obj_id) in enumerate(pairs):
            jm, jr, jd = object_statistics(j[idx])
            fm, fr, fd = object_statistics(f[idx])
            entry = {}
            if task == 'unsupervised':
                entry.update(matched_proposal_id=prop_id, matched_gt_object_id=obj_id)
            entry.update({'J-Mean': jm, 'J-Recall': jr, 'J-Decay': jd,
                          'F-Mean': fm, 'F-Recall': fr, 'F-Decay': fd, 'frames': frames,
                          'J-per-frame': j[idx].tolist(), 'F-per-frame': f[idx].tolist()})
            per_object[f'{plan["seq"]}_{idx + 1}'] = entry
            for name, value in zip(stats, (jm, jr, jd, fm, fr, fd)):
                stats[name].append(value)
    if not per_object:
        raise ValueError(f'no objects to evaluate: the first GT frame of every sequence in '
                         f'{annotation_dir(davis_path, task)} is empty')
    means = {name: float(np.mean(values)) for name, values in stats.items()}
    global_res = dict(zip(GLOBAL_COLUMNS, (
        (means['JM'] + means['FM']) / 2, means['JM'], means['JR'], means['JD'],
        means['FM'], means['FR'], means['FD'])))
    return {'task': task, 'set': set_name, 'year': year, 'sequences': list(sequences),
            'global': global_res, 'per_object': per_object}


# ------------------------------------------------------------------------------------------
# a whole results folder, with the toolkit's CSVs (tools/davis_eval.py is the command line)


def csv_paths(results_path, set_name):
    return (os.path.join(results_path, f'global_results-{set_name}.csv'),
            os.path.join(results_path, f'per-sequence_results-{set_name}.csv'))


def write_csvs(scores, results_path, set_name):
    """The toolkit's two CSVs (values in [0, 1], ``%.3f``, one per-sequence row per object)."""
    global_csv, seq_csv = csv_paths(results_path, set_name)
    g = scores['global']
    atomic_write_text(global_csv, ','.join(GLOBAL_COLUMNS) + '\n'
                      + ','.join(f'{g[c]:.3f}' for c in GLOBAL_COLUMNS) + '\n')
    rows = ['Sequence,J-Mean,F-Mean']
    rows += [f'{name},{obj["J-Mean"]:.3f},{obj["F-Mean"]:.3f}'
             for name, obj in scores['per_object'].items()]
    atomic_write_text(seq_csv, '\n'.join(rows) + '\n')
    return global_csv, seq_csv


def _table(header, rows):
    """Right-aligned text table, like ``pandas.DataFrame.to_string(index=False)``."""
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return '\n'.join(' '.join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def format_tables(scores):
    set_name = scores['set']
    g = scores['global']
    out = [f'--------------------------- Global results for {set_name} ---------------------------',
           _table(GLOBAL_COLUMNS, [[f'{g[c]:.6f}' for c in GLOBAL_COLUMNS]]),
           '', f'---------- Per sequence results for {set_name} ----------',
           _table(('Sequence', 'J-Mean', 'F-Mean'),
                  [[n, f'{o["J-Mean"]:.6f}', f'{o["F-Mean"]:.6f}']
                   for n, o in scores['per_object'].items()])]
    return '\n'.join(out)


def evaluate_davis(davis_path, results_path, task='semi-supervised', set='val', year=2017,
                   workers=None, json_path=None, write_csv=True, verbose=False):
    """Score ``results_path`` against the DAVIS ground truth in ``davis_path``.

    Args:
        davis_path: DAVIS root (``ImageSets``, ``Annotations/480p`` ...).
        results_path: folder of ``<seq>/<frame>.png`` label maps.
        task: 'semi-supervised' or 'unsupervised'.
        set: image set name ('val', 'train', ...).
        year: 2017, or 2016 for binary single-object masks.
        workers: processes (default: all cores; 1 = in-process; same numbers either way).
        json_path: if given, write the full-precision scores there.
        write_csv: write the toolkit's CSVs into ``results_path``.
        verbose: print the tables.

    Returns:
        dict with 'global' (``J&F-Mean``, ``J-Mean``, ``J-Recall``, ``J-Decay``, ``F-Mean``,
        ``F-Recall``, ``F-Decay``; values in [0, 1]) and 'per_object' keyed ``<seq>_<k>``.
    """
    set_name = set
    scores = evaluate_dataset(davis_path, results_path, task=task, set_name=set_name, year=year,
                              workers=workers)
    scores['davis_path'] = os.path.abspath(davis_path)
    scores['results_path'] = os.path.abspath(results_path)
    if write_csv:
        write_csvs(scores, results_path, set_name)
    if json_path:
        atomic_write_json(json_path, scores)
    if verbose:
        print(format_tables(scores))
    return scores
