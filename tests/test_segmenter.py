"""VideoObjectSegmenter: bounded memory, object bookkeeping, and equality with the evaluator loop.

Models have random weights (the bookkeeping and the engine driving do not depend on them). The
evaluator loop below is written independently of the segmenter, from upstream's
``networks/managers/evaluator.py`` (upstream's evaluator loop; docs/upstream_differences.md, "Evaluation").
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs.default import available_models, build_config
from dataloaders.eval_transforms import MultiRestrictSize, MultiToTensor
from networks.engines import build_engine
from networks.managers import segmenter as segmenter_module
from networks.managers.segmenter import VideoObjectSegmenter
from networks.models import build_vos_model
from utils.video_io import FrameSourceError


# -- inputs -------------------------------------------------------------------------------
class SyntheticClip:
    """A frame source that draws each frame on demand: two discs moving over a texture."""

    def __init__(self, n, h, w, seed=0):
        rng = np.random.default_rng(seed)
        self.texture = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        self.size, self.fps, self._n = (h, w), None, n
        self.names = [f'{i:05d}' for i in range(n)]

    def __len__(self):
        return self._n

    def centres(self, i):
        h, w = self.size
        return [(h * 0.3, w * (0.2 + 0.6 * ((i * 0.03) % 1))), (h * 0.7, w * 0.5 + 0.1 * w *
                                                                np.sin(i / 5))]

    def label(self, i, ids=(1, 2)):
        h, w = self.size
        yy, xx = np.mgrid[:h, :w]
        out = np.zeros((h, w), np.int64)
        for oid, (cy, cx) in zip(ids, self.centres(i)):
            out[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.18 * min(h, w)) ** 2] = oid
        return out

    def frame(self, i):
        img = np.roll(self.texture, i, axis=1).copy()
        lab = self.label(i)
        img[lab == 1] = (220, 40, 40)
        img[lab == 2] = (40, 200, 60)
        return img

    def iter_frames(self, start=0):
        for i in range(start, self._n):
            yield self.frame(i)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine
    # oversubscribed threads make each frame ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def deaott():
    torch.manual_seed(0)
    cfg = build_config('pre_ytb_dav', 'default', 'deaott')
    return build_vos_model(cfg.MODEL_VOS, cfg).eval()


def run_api(seg, clip, prompts, removals=()):
    seg.open(clip)
    for t, mask in prompts.items():
        seg.add_mask(t, mask)
    for t, oid in removals:
        seg.remove_object(oid, frame_idx=t)
    return list(seg.propagate())


# -- the evaluator loop, independently ---------------------------------------------------
def evaluator_loop(model, frames, prompts, gap, max_long_edge=1040.):
    """Drive the engine as upstream's evaluator does (one augmentation, no cap).

    ``prompts``: frame -> user-id map; user ids are made contiguous in order of appearance
    (sorted within a frame), as the YouTube-VOS loader does, and mapped back at the end.
    """
    cfg = model.cfg
    resize = MultiRestrictSize(None, max_long_edge, False, [1.], cfg.MODEL_ALIGN_CORNERS)
    to_tensor = MultiToTensor()
    obj_idx = [0]
    for t in sorted(prompts):
        obj_idx += [int(v) for v in np.unique(prompts[t]) if v and v not in obj_idx]
    to_contig = {u: i for i, u in enumerate(obj_idx)}

    def contig(mask):
        out = np.zeros(mask.shape, np.float32)
        for u, i in to_contig.items():
            out[mask == u] = i
        return torch.from_numpy(out)[None, None]

    engine = build_engine(cfg.MODEL_ENGINE, phase='eval', aot_model=model, gpu_id=0,
                          long_term_mem_gap=gap, short_term_mem_skip=1)
    labels, probs = [], []
    with torch.no_grad():
        for t, frame in enumerate(frames):
            img = to_tensor(resize({'current_img': frame}))[0]['current_img'][None]
            in_size, out_size = img.shape[-2:], frame.shape[:2]
            if t == 0:
                gt = contig(prompts[0])
                engine.add_reference_frame(img, F.interpolate(gt, size=in_size, mode='nearest'),
                                           frame_step=0, obj_nums=[int(gt.max())])
                n_known = int(gt.max())
                labels.append(gt[0, 0])
                probs.append(None)
                continue
            engine.match_propogate_one_frame(img)
            prob = torch.softmax(engine.decode_current_logits(out_size), dim=1)
            label = torch.argmax(prob, dim=1, keepdim=True).float()
            if t in prompts:
                gt = contig(prompts[t])
                keep = (gt == 0).float()
                label = label * keep + gt * (1 - keep)
                label_in = F.interpolate(label, size=in_size, mode='nearest')
                n_known = int(label.max())
                engine.add_reference_frame(img, label_in, obj_nums=[n_known], frame_step=t)
                engine.decode_current_logits(out_size)
                engine.update_memory(label_in)
                probs.append(None)
            else:
                engine.update_memory(F.interpolate(label, size=in_size, mode='nearest'))
                probs.append({u: prob[0, i].numpy() for u, i in to_contig.items()
                              if 0 < i <= n_known})
            labels.append(label[0, 0])
    lut = np.asarray(obj_idx)
    return [lut[lab.long().numpy()] for lab in labels], probs


def evaluator_step_loop(model, frames, prompts, gap):
    """The same clip through ``Evaluator.step`` of networks/managers/evaluator.py (the code
    tools/eval.py runs), one augmentation; frame 0 as its ``evaluate_sequence`` does."""
    from networks.managers.evaluator import Evaluator
    cfg = model.cfg
    ev = Evaluator.__new__(Evaluator)  # only what step() reads; no dataset needed
    ev.cfg, ev.amp, ev.amp_dtype, ev.device = cfg, False, torch.float32, torch.device('cpu')
    resize = MultiRestrictSize(None, 1040., False, [1.], cfg.MODEL_ALIGN_CORNERS)
    obj_idx = [0]
    for t in sorted(prompts):
        obj_idx += [int(v) for v in np.unique(prompts[t]) if v and v not in obj_idx]
    lut_in = np.zeros(max(obj_idx) + 1, np.float32)
    lut_in[obj_idx] = np.arange(len(obj_idx))
    engine = build_engine(cfg.MODEL_ENGINE, phase='eval', aot_model=model, gpu_id=0,
                          long_term_mem_gap=gap, short_term_mem_skip=1)
    labels, n_obj = [], 0
    with torch.no_grad():
        for t, frame in enumerate(frames):
            img = MultiToTensor()(resize({'current_img': frame}))[0]['current_img'][None]
            given = None
            if t in prompts:
                given = torch.from_numpy(lut_in[prompts[t]])[None, None]
                n_obj = max(n_obj, int(given.max()))
            if t == 0:
                engine.add_reference_frame(img, F.interpolate(given, size=img.shape[-2:],
                                                              mode='nearest'),
                                           frame_step=0, obj_nums=[n_obj])
                labels.append(given[0, 0])
                continue
            labels.append(ev.step([engine], [img], [given], [False], frame.shape[:2], t,
                                  n_obj)[0, 0])
    return [np.asarray(obj_idx)[lab.long().numpy()] for lab in labels]


def grid_ids(h, w, ids):
    """An id map with one rectangle per id, on a grid."""
    mask = np.zeros((h, w), np.int64)
    cols = 4
    for k, oid in enumerate(ids):
        r, c = divmod(k, cols)
        mask[4 + r * 20:4 + r * 20 + 14, 4 + c * 36:4 + c * 36 + 30] = oid
    return mask


@pytest.mark.parametrize('first_ids,new_id', [((3, 8), 5), (tuple(range(20, 32)), 7)],
                         ids=['2+1 objects', '12+1 objects (2 sub-engines)'])
def test_cap_off_equals_evaluator_loop(deaott, first_ids, new_id):
    # 100x150 frames are resized to the aligned 97x145 network input and decoded back.
    clip = SyntheticClip(7, 100, 150, seed=1)
    frames = [clip.frame(i) for i in range(len(clip))]
    new = np.zeros((100, 150), np.int64)
    new[70:95, 100:140] = new_id
    prompts = {0: grid_ids(100, 150, first_ids), 3: new}
    ref_labels, ref_probs = evaluator_loop(deaott, frames, prompts, gap=2)
    eval_labels = evaluator_step_loop(deaott, frames, prompts, gap=2)

    seg = VideoObjectSegmenter(deaott, device='cpu', long_term_mem_max=None, long_term_mem_gap=2)
    out = run_api(seg, clip, prompts)
    assert [o.frame_idx for o in out] == list(range(len(frames)))
    for t, (o, ref) in enumerate(zip(out, ref_labels)):
        np.testing.assert_array_equal(o.label, ref, err_msg=f'frame {t}')
        np.testing.assert_array_equal(o.label, eval_labels[t], err_msg=f'evaluator, frame {t}')
        if ref_probs[t] is not None:
            assert sorted(o.probs) == sorted(ref_probs[t])
            for oid, p in ref_probs[t].items():
                np.testing.assert_allclose(o.probs[oid], p, rtol=0, atol=1e-6)
    assert set(np.unique(out[-1].label)) <= {0, new_id, *first_ids}


def test_long_video_memory_is_flat_after_cap(deaott):
    # 300 frames at 65x65: 5x5 = 25 tokens per stored frame; a frame is stored every 2.
    clip, gap, cap, tokens = SyntheticClip(300, 65, 65), 2, 4, 25
    seg = VideoObjectSegmenter(deaott, device='cpu', long_term_mem_max=cap,
                               long_term_mem_gap=gap, return_probs=False)
    seg.open(clip)
    seg.add_mask(0, clip.label(0))
    counts, stored_bytes = [], []
    for out in seg.propagate():
        counts.append(seg.num_long_term_tokens)
        stored_bytes.append(seg.memory_bytes())
        steps = seg.engine.aot_engines[0].memory.long_term_steps
        assert steps[-1] == 0, 'the reference frame must stay in memory'
    assert len(counts) == 300
    expected = [min(1 + t // gap, cap) * tokens for t in range(300)]
    assert counts == expected
    full = expected.index(cap * tokens)
    assert full < 10
    assert len(set(stored_bytes[full:])) == 1, 'stored memory must not grow after the cap'

    # Without the cap the same run grows by one frame every `gap` frames.
    seg = VideoObjectSegmenter(deaott, device='cpu', long_term_mem_max=None,
                               long_term_mem_gap=gap, return_probs=False)
    seg.open(clip)
    seg.add_mask(0, clip.label(0))
    counts = [seg.num_long_term_tokens for _ in seg.propagate(max_frames=30)]
    assert counts == [(1 + t // gap) * tokens for t in range(30)]


class IdentityEngine:
    """Stand-in engine whose prediction is the label it last stored (perfect tracking of
    a static scene), so the segmenter's bookkeeping can be checked exactly."""

    def __init__(self, **kwargs):
        self.aot_engines = []
        self.num_long_term_tokens = 0

    def add_reference_frame(self, img, mask, obj_nums, frame_step=-1):
        self.label, self.obj_nums = mask.clone(), obj_nums[0]

    def match_propogate_one_frame(self, img):
        pass

    def decode_current_logits(self, output_size=None, live_only=False):
        size = self.label.shape[-2:] if output_size is None else output_size
        label = F.interpolate(self.label, size=size, mode='nearest')[:, 0].long()
        channels = 1 + 10 * max(1, -(-self.obj_nums // 10))
        logits = 10. * F.one_hot(label, channels).permute(0, 3, 1, 2).float()
        return logits[:, :1 + self.obj_nums] if live_only and channels == 11 else logits

    def update_memory(self, mask):
        self.label = mask.clone()


def test_added_object_appears_from_its_frame_and_removed_never_returns(deaott, monkeypatch):
    monkeypatch.setattr(segmenter_module, 'build_engine', lambda *a, **k: IdentityEngine())
    h, w, n, k, r = 65, 97, 12, 4, 8
    clip = SyntheticClip(n, h, w)
    first = np.zeros((h, w), np.int64)
    first[5:30, 5:40] = 3
    first[35:60, 50:90] = 200
    added = np.zeros((h, w), np.int64)
    added[10:25, 60:90] = 7
    seg = VideoObjectSegmenter(deaott, device='cpu')
    out = run_api(seg, clip, {0: first, k: added}, removals=[(r, 3)])
    for t, o in enumerate(out):
        expected = first.copy()
        if t >= k:
            expected[added > 0] = 7
        if t >= r:
            expected[expected == 3] = 0
        np.testing.assert_array_equal(o.label, expected, err_msg=f'frame {t}')
        assert sorted(o.probs) == sorted({200} | ({7} if t >= k else set())
                                         | ({3} if t < r else set()))
    assert seg.objects == [200, 7]

    # Re-adding a removed id starts a new object: it is tracked again from then on.
    seg.open(clip)
    seg.add_mask(0, first)
    outs = [seg.step(clip.frame(0))]
    seg.remove_object(3)
    outs.append(seg.step(clip.frame(1)))
    back = np.where(first == 3, 3, 0)
    outs.append(seg.step(clip.frame(2), mask=back))
    outs.append(seg.step(clip.frame(3)))
    assert 3 not in outs[1].label and 3 not in outs[1].probs
    np.testing.assert_array_equal(outs[3].label, first)


def test_added_and_removed_objects_with_real_model(deaott):
    h, w, k, r = 65, 97, 3, 5
    clip = SyntheticClip(9, h, w)
    added = np.zeros((h, w), np.int64)
    added[40:60, 70:95] = 7
    seg = VideoObjectSegmenter(deaott, device='cpu', long_term_mem_gap=2, long_term_mem_max=3)
    out = run_api(seg, clip, {0: clip.label(0, ids=(3, 4)), k: added}, removals=[(r, 3)])
    for t, o in enumerate(out):
        assert (7 in o.probs) == (t >= k)
        assert (3 in o.probs) == (t < r)
        if t < k:
            assert 7 not in o.label
        if t >= r:
            assert 3 not in o.label
        total = sum(o.probs.values())
        assert np.all(total <= 1 + 1e-5)
    assert np.all(out[k].label[added > 0] == 7)   # the given mask is the output on its frame
    np.testing.assert_array_equal(out[0].label, clip.label(0, ids=(3, 4)))


def test_step_equals_propagate(deaott):
    clip = SyntheticClip(6, 65, 97, seed=3)
    added = np.zeros((65, 97), np.int64)
    added[45:60, 5:30] = 9
    seg = VideoObjectSegmenter(deaott, device='cpu', long_term_mem_gap=2)
    batch = run_api(seg, clip, {0: clip.label(0), 2: added})
    live = VideoObjectSegmenter(deaott, device='cpu', long_term_mem_gap=2)
    masks = {0: clip.label(0), 2: added}
    for t in range(len(clip)):
        o = live.step(clip.frame(t), mask=masks.get(t))
        assert o.frame_idx == t
        np.testing.assert_array_equal(o.label, batch[t].label)


def _model_configs():
    cfgs = [('deaott', None), ('aott', None)]
    gda = build_config('pre_ytb_dav', 'default', 'deaott')
    gda.MODEL_LT_ATTENTION = 'deformable'
    cfgs.append(('deaott', gda))
    cfgs += [(m, None) for m in available_models() if 'gda' in m]
    return cfgs


@pytest.mark.parametrize('model_id,cfg', _model_configs(),
                         ids=lambda v: v if isinstance(v, str) else ('gda' if v else ''))
def test_every_model_kind_runs(model_id, cfg):
    clip = SyntheticClip(4, 33, 49)
    seg = VideoObjectSegmenter(model_id, cfg=cfg, device='cpu', long_term_mem_gap=1,
                               long_term_mem_max=2)
    added = np.zeros((33, 49), np.int64)
    added[2:10, 35:47] = 12
    out = run_api(seg, clip, {0: clip.label(0, ids=(2, 5)), 2: added})
    assert len(out) == 4
    for o in out:
        assert o.label.shape == (33, 49) and o.label.dtype == np.uint8
        assert set(np.unique(o.label)) <= {0, 2, 5, 12}
        assert all(p.shape == (33, 49) and np.all(np.isfinite(p)) for p in o.probs.values())
    assert seg.num_long_term_frames == 2


def test_bf16_autocast_on_cpu(deaott):
    clip = SyntheticClip(4, 65, 97)
    seg = VideoObjectSegmenter(deaott, device='cpu', amp=True)
    assert seg.dtype == torch.bfloat16
    out = run_api(seg, clip, {0: clip.label(0)})
    for o in out:
        assert o.label.dtype == np.uint8 and set(np.unique(o.label)) <= {0, 1, 2}
        total = sum(o.probs.values())
        assert all(p.dtype == np.float32 for p in o.probs.values())
        assert np.all(np.isfinite(total)) and np.all(total <= 1 + 1e-5)


def test_mask_from_file_and_clear_errors(deaott, tmp_path):
    clip = SyntheticClip(3, 65, 97)
    ids = clip.label(0, ids=(4, 9))
    png = tmp_path / 'first.png'
    img = Image.fromarray(ids.astype(np.uint8), mode='L').convert('P')
    img.putpalette([0, 0, 0, 255, 0, 0] * 128)
    img.save(png)
    seg = VideoObjectSegmenter(deaott, device='cpu')
    seg.open(clip)
    assert seg.add_mask(0, png) == [4, 9]
    from_file = list(seg.propagate())
    seg.open(clip)
    seg.add_mask(0, ids)
    np.testing.assert_array_equal(from_file[1].label, list(seg.propagate())[1].label)

    small = tmp_path / 'small.png'
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    seg.open(clip)
    with pytest.raises(ValueError, match='small.png'):
        seg.add_mask(0, small)
    with pytest.raises(ValueError, match='frame size'):
        seg.add_mask(0, np.zeros((64, 97), np.int64))
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not a png')
    with pytest.raises(ValueError, match='broken.png'):
        seg.add_mask(0, broken)
    with pytest.raises(IndexError, match='beyond the video'):
        seg.add_mask(3, ids)
    with pytest.raises(KeyError, match='no object 4'):
        seg.remove_object(4)
    with pytest.raises(RuntimeError, match='add_mask'):
        next(seg.propagate())
    seg.add_mask(0, ids)
    next(seg.propagate())
    with pytest.raises(ValueError, match='already segmented'):
        seg.add_mask(0, ids)
    bad_video = tmp_path / 'clip.mp4'
    bad_video.write_bytes(b'\x00' * 100)
    with pytest.raises(FrameSourceError, match='clip.mp4'):
        seg.open(bad_video)
