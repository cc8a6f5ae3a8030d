"""ONNX export of the per-frame step and the onnxruntime backend against the torch engine.

The model is ``deaott_gda`` with the golden-recipe weights (non-degenerate features; PyTorch's
default init collapses MobileNetV2). Inputs are small (65x97 frames: 5x7 tokens) so the file
runs in well under a minute on one thread.
"""
import os
import shutil

import numpy as np
import pytest
import torch

ort = pytest.importorskip('onnxruntime', reason="needs onnxruntime (pip install -e '.[onnx]')")
onnx = pytest.importorskip('onnx', reason="needs onnx (pip install -e '.[onnx]')")

from configs.default import build_config  # noqa: E402
from networks.engines.onnx_graphs import (OPSET, bundle_paths, export_student,  # noqa: E402
                                          graph_layout)
from networks.managers.onnx_backend import OnnxModelError, OnnxStudent  # noqa: E402
from networks.managers.segmenter import VideoObjectSegmenter  # noqa: E402
from networks.models import build_vos_model  # noqa: E402
from tests.conftest import shared_path  # noqa: E402
from tests.golden_weights import recipe_for_module  # noqa: E402
from tools import export_onnx  # noqa: E402

H, W = 65, 97   # network input = frame size (16k+1 on both sides: no test-time resize)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_model(seed=3, model_id='deaott_gda'):
    cfg = build_config('pre_ytb_dav', 'default', model_id)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    model.load_state_dict(recipe_for_module(model, seed), strict=True)
    return cfg, model.eval()


@pytest.fixture(scope='module')
def model():
    return recipe_model()


@pytest.fixture(scope='module')
def bundle(model, tmp_path_factory):
    cfg, net = model
    out = tmp_path_factory.mktemp('onnx') / 'student.onnx'
    return export_student(net, cfg, str(out), (H, W))


class Clip:
    """Frames drawn on demand: three textured discs moving over a texture."""

    def __init__(self, n, h, w, seed=0):
        rng = np.random.default_rng(seed)
        self.texture = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        self.patch = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        self.size, self.fps, self._n = (h, w), None, n
        self.names = [f'{i:05d}' for i in range(n)]

    def __len__(self):
        return self._n

    def label(self, i):
        h, w = self.size
        yy, xx = np.mgrid[:h, :w]
        out = np.zeros((h, w), np.int64)
        centres = [(0.3, 0.2 + 0.02 * i), (0.7, 0.5 + 0.1 * np.sin(i / 3)), (0.5, 0.8 - 0.02 * i)]
        for oid, (cy, cx) in enumerate(centres, 1):
            out[(yy - cy * h) ** 2 + (xx - cx * w) ** 2 < (0.17 * min(h, w)) ** 2] = oid
        return out

    def frame(self, i):
        img = np.roll(self.texture, 2 * i, axis=1).copy()
        lab = self.label(i)
        colours = [(220, 40, 40), (40, 200, 60), (30, 60, 220)]
        for oid, c in enumerate(colours, 1):
            img[lab == oid] = (np.asarray(c) * 0.7 + self.patch[lab == oid] * 0.3).astype(np.uint8)
        return img

    def iter_frames(self, start=0):
        for i in range(start, self._n):
            yield self.frame(i)


def run_both(net, cfg, path, clip, prompts, **kw):
    """Per frame: (torch logits, onnx logits, torch probs, torch labels, onnx labels) and both
    segmenters after the run."""
    segs = [VideoObjectSegmenter(net, ckpt_path=None, cfg=cfg, device='cpu', **kw),
            VideoObjectSegmenter(cfg.MODEL_ID, ckpt_path=path, device='cpu',
                                 backend='onnxruntime', onnx_threads=1, **kw)]
    for seg in segs:
        seg.open(clip)
        for t, mask in prompts.items():
            seg.add_mask(t, mask)
    per_frame = []
    for (a, b) in zip(segs[0].propagate(), segs[1].propagate()):
        la, lb = ([None if e.pred_id_logits is None else e.pred_id_logits.clone()
                   for e in seg.engine.aot_engines] for seg in segs)
        per_frame.append((a, b, la, lb))
    return segs, per_frame


def unambiguous(probs_a, ids, margin=1e-3):
    """Pixels whose two most likely objects differ by more than ``margin``."""
    ids = [i for i in ids if i in probs_a]   # objects tracked on this frame
    stack = np.stack([np.clip(1 - sum(probs_a.values()), 0, 1)] + [probs_a[i] for i in ids])
    top2 = np.sort(stack, axis=0)[-2:]
    return (top2[1] - top2[0]) > margin


def assert_same_run(segs, per_frame, ids, tol=1e-4):
    checked = 0
    for a, b, la, lb in per_frame:
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            if x is None:   # the first frame is only referenced, not decoded
                assert y is None
                continue
            diff = float((x - y).abs().max())
            assert diff < tol, f'frame {a.frame_idx}: logits differ by {diff}'
            checked += 1
        clear = unambiguous(a.probs, ids)
        assert clear.mean() > 0.9
        assert np.array_equal(a.label[clear], b.label[clear]), f'frame {a.frame_idx}: labels'
        assert a.probs.keys() == b.probs.keys()
        for i in a.probs:
            assert np.abs(a.probs[i] - b.probs[i]).max() < tol
    assert checked >= len(per_frame) - 1
    # The memory policy is the same code: the same frames stored, pinned and capped.
    for ea, eb in zip(segs[0].engine.aot_engines, segs[1].engine.aot_engines):
        assert ea.memory.long_term_steps == eb.memory.long_term_steps
        assert ea.memory.long_term_pinned == eb.memory.long_term_pinned
        assert ea.memory.num_long_term_tokens() == eb.memory.num_long_term_tokens()
        assert ea.frame_step == eb.frame_step
    def sizes(seg):   # numel of every stored tensor (short-term: torch 2D, onnx seq-first)
        return [[[t.numel() for t in (entry.key, entry.value, entry.id_value) if t is not None]
                 for layer in e.memory.long_term + e.memory.short_term_queue for entry in layer]
                for e in seg.engine.aot_engines]
    assert sizes(segs[0]) == sizes(segs[1])
    # onnxruntime's entries are separate arrays (torch's keys are views of a wider projection,
    # whose whole storage memory_bytes() counts), and long- and short-term share a new frame.
    assert 0 < segs[1].memory_bytes() <= segs[0].memory_bytes()


# -- the graphs ------------------------------------------------------------------------------
def test_every_graph_equals_torch(model, bundle):
    _, net = model
    diffs = export_onnx.check_export(net, bundle, seed=1)
    assert set(diffs) == {'encode', 'reference', 'propagate', 'write'}
    assert max(diffs.values()) < 1e-4, diffs
    student = OnnxStudent(bundle['propagate'], threads=1)
    assert student.opset == OPSET >= 16
    assert student.input_size == (H, W)
    assert student.layout.enc_size == (5, 7)
    # The long-term token axis is the only dynamic one.
    sess = student.sessions['propagate']
    dyn = {i.name: [d for d in i.shape if isinstance(d, str)] for i in sess.get_inputs()}
    assert all(v == ['lt_tokens'] for k, v in dyn.items() if k.startswith('lt'))
    assert all(v == [] for k, v in dyn.items() if not k.startswith('lt'))


def test_export_is_deterministic(model, bundle, tmp_path):
    cfg, net = model
    again = export_student(net, cfg, str(tmp_path / 'again.onnx'), (H, W))
    for role in bundle:
        with open(bundle[role], 'rb') as f1, open(again[role], 'rb') as f2:
            assert f1.read() == f2.read(), role
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


# -- the backend against the torch engine --------------------------------------------------
def test_segmenter_onnxruntime_equals_torch_with_memory_policy(model, bundle):
    """Two objects on frame 0, a third added on frame 4 (a second reference frame), memory gap
    2 and a cap of 3 frames: logits within 1e-4, the same labels, the same stored frames."""
    cfg, net = model
    clip = Clip(11, H, W)
    first = np.where(clip.label(0) == 3, 0, clip.label(0))
    later = np.where(clip.label(4) == 3, 3, 0)
    segs, per_frame = run_both(net, cfg, bundle['propagate'], clip, {0: first, 4: later},
                               long_term_mem_max=3, long_term_mem_gap=2)
    assert_same_run(segs, per_frame, [1, 2, 3])
    mem = segs[1].engine.aot_engines[0].memory
    # Reference frames 0 and 4 stay; the cap keeps one more (the newest gap frame).
    assert mem.long_term_steps == [10, 4, 0] and mem.long_term_pinned == [False, True, True]


def test_more_objects_than_one_sub_engine(model, bundle):
    """12 objects: two sub-engines share the encoding and are merged by soft aggregation."""
    cfg, net = model
    clip = Clip(4, H, W, seed=1)
    ids = np.zeros((H, W), np.int64)
    for k in range(12):
        r, c = divmod(k, 4)
        ids[8 + 18 * r:20 + 18 * r, 6 + 23 * c:20 + 23 * c] = k + 1
    segs, per_frame = run_both(net, cfg, bundle['propagate'], clip, {0: ids},
                               long_term_mem_max=2, long_term_mem_gap=1)
    assert len(segs[1].engine.aot_engines) == 2
    assert_same_run(segs, per_frame, list(range(1, 13)))


def test_davis_val_dev_sequence_downscaled(model, tmp_path):
    """One val-dev sequence at 97x177 (8 frames): logits within 1e-4, labels equal."""
    import cv2
    from utils.image import read_mask
    root = shared_path('data', 'davis2016-val-dev')
    seq = sorted(os.listdir(root / 'JPEGImages' / '480p'))[0]
    names = sorted(os.listdir(root / 'JPEGImages' / '480p' / seq))[:8]
    h, w = 97, 177
    frames = [cv2.resize(cv2.imread(str(root / 'JPEGImages' / '480p' / seq / n))[:, :, ::-1],
                         (w, h), interpolation=cv2.INTER_AREA) for n in names]
    gt = read_mask(str(root / 'Annotations' / '480p' / seq / (names[0][:-4] + '.png')))
    gt = cv2.resize(gt.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)

    class Frames:
        size, fps, names_ = (h, w), None, names

        def __len__(self):
            return len(frames)

        def iter_frames(self, start=0):
            yield from (np.ascontiguousarray(f) for f in frames[start:])

    cfg, net = model
    paths = export_student(net, cfg, str(tmp_path / 'davis.onnx'), (h, w))
    segs, per_frame = run_both(net, cfg, paths['propagate'], Frames(), {0: gt},
                               long_term_mem_max=4, long_term_mem_gap=2)
    ids = sorted(int(v) for v in np.unique(gt) if v)
    assert ids
    assert_same_run(segs, per_frame, ids)


# -- bad files ---------------------------------------------------------------------------------
def copy_bundle(bundle, folder):
    out = {}
    for role, p in bundle.items():
        out[role] = str(folder / os.path.basename(p))
        shutil.copyfile(p, out[role])
    return out


def test_bad_or_mismatched_files_are_named(model, bundle, tmp_path):
    cfg, net = model
    # A missing companion.
    (tmp_path / 'missing').mkdir()
    b = copy_bundle(bundle, tmp_path / 'missing')
    os.remove(b['write'])
    with pytest.raises(OnnxModelError, match=r'student\.write\.onnx: no such file'):
        OnnxStudent(b['propagate'])
    # Not ONNX at all.
    (tmp_path / 'garbage').mkdir()
    b = copy_bundle(bundle, tmp_path / 'garbage')
    with open(b['reference'], 'wb') as f:
        f.write(b'this is not a protobuf' * 10)
    with pytest.raises(OnnxModelError, match=r'student\.reference\.onnx: not a readable ONNX'):
        OnnxStudent(b['propagate'])
    # A valid ONNX model from elsewhere (no export metadata).
    (tmp_path / 'foreign').mkdir()
    b = copy_bundle(bundle, tmp_path / 'foreign')
    node = onnx.helper.make_node('Relu', ['x'], ['y'])
    graph = onnx.helper.make_graph(
        [node], 'g', [onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', 17)]),
              b['encode'])
    with pytest.raises(OnnxModelError, match=r'student\.encode\.onnx: not written by'):
        OnnxStudent(b['propagate'])
    # A graph in the wrong place.
    (tmp_path / 'swapped').mkdir()
    b = copy_bundle(bundle, tmp_path / 'swapped')
    shutil.copyfile(bundle['encode'], b['write'])
    with pytest.raises(OnnxModelError, match=r"student\.write\.onnx: holds the 'encode' graph"):
        OnnxStudent(b['propagate'])
    # A graph of another export (other weights).
    (tmp_path / 'mixed').mkdir()
    b = copy_bundle(bundle, tmp_path / 'mixed')
    _, other = recipe_model(seed=4)
    other_paths = export_student(other, cfg, str(tmp_path / 'other.onnx'), (H, W))
    shutil.copyfile(other_paths['write'], b['write'])
    with pytest.raises(OnnxModelError, match=r'student\.write\.onnx: belongs to another export'):
        OnnxStudent(b['propagate'])
    # Frames of another size than the export.
    seg = VideoObjectSegmenter('deaott_gda', ckpt_path=bundle['propagate'], device='cpu',
                               backend='onnxruntime', onnx_threads=1)
    clip = Clip(2, 81, 97)
    seg.open(clip)
    seg.add_mask(0, clip.label(0))
    with pytest.raises(OnnxModelError, match=r'student\.onnx: exported for a 65x97'):
        next(seg.propagate())
    # Another model id than the export's.
    with pytest.raises(OnnxModelError, match=r"student\.onnx: exported from model 'deaott_gda'"):
        VideoObjectSegmenter('deaott', ckpt_path=bundle['propagate'], backend='onnxruntime')
    with pytest.raises(ValueError, match=r'needs ckpt_path= the \.onnx file'):
        VideoObjectSegmenter('deaott_gda', ckpt_path='x.pth', backend='onnxruntime')
    with pytest.raises(ValueError, match='float32'):
        VideoObjectSegmenter('deaott_gda', ckpt_path=bundle['propagate'], backend='onnxruntime',
                             amp=True)


# -- the CLIs ---------------------------------------------------------------------------------
def test_export_cli_with_a_checkpoint_and_demo_backend(model, tmp_path, capsys):
    import json

    from tools import demo
    from utils.checkpoint import save_network
    from utils.image import save_mask
    cfg, net = model
    ckpt = save_network(net, 1, str(tmp_path / 'ckpt'))
    out = tmp_path / 'cli' / 'student.onnx'
    rc = export_onnx.main(['--model', 'deaott_gda', '--ckpt_path', str(ckpt), '--out', str(out),
                           '--frame_size', str(H), str(W), '--check'])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    summary = json.loads(printed)
    assert summary['input_size'] == [H, W] and summary['opset'] == OPSET and summary['trained']
    assert max(summary['max_abs_diff'].values()) < 1e-4
    assert set(summary['files']) == {'encode', 'reference', 'propagate', 'write'}
    assert bundle_paths(str(out))['propagate'] == str(out)
    assert OnnxStudent(str(out)).layout.to_dict() == graph_layout(net, (H, W)).to_dict()
    # Another process, the same checkpoint: the same bytes.
    import subprocess
    import sys
    again = tmp_path / 'cli2' / 'student.onnx'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, os.path.join('tools', 'export_onnx.py'), '--ckpt_path',
                    str(ckpt), '--out', str(again), '--frame_size', str(H), str(W)],
                   check=True, capture_output=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for role, p in bundle_paths(str(out)).items():
        with open(p, 'rb') as f1, open(bundle_paths(str(again))[role], 'rb') as f2:
            assert f1.read() == f2.read(), role

    # Bad CLI input: a clear one-line error.
    assert export_onnx.main(['--out', str(tmp_path / 'x.bin'), '--untrained']) == 2
    assert export_onnx.main(['--ckpt_path', str(tmp_path / 'nope.pth'),
                             '--out', str(tmp_path / 'x.onnx')]) == 2
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    assert export_onnx.main(['--ckpt_path', str(bad), '--out', str(tmp_path / 'x.onnx')]) == 2
    err = capsys.readouterr().err
    assert 'x.bin' in err and 'nope.pth: no such checkpoint' in err
    assert f'cannot read checkpoint {bad}' in err and not (tmp_path / 'x.onnx').exists()

    # tools/demo.py --backend onnxruntime on a frame folder.
    clip = Clip(4, H, W)
    frames = tmp_path / 'frames'
    frames.mkdir()
    from PIL import Image
    for i in range(4):
        Image.fromarray(clip.frame(i)).save(frames / f'{i:05d}.png')
    save_mask(clip.label(0).astype(np.uint8), str(tmp_path / 'mask.png'))
    res = tmp_path / 'demo_out'
    rc = demo.main(['--input', str(frames), '--mask', str(tmp_path / 'mask.png'), '--output',
                    str(res), '--ckpt_path', str(out), '--backend', 'onnxruntime',
                    '--device', 'cpu'])
    assert rc == 0, capsys.readouterr().err
    with open(res / 'summary.json') as f:
        summary = json.load(f)
    assert summary['backend'] == 'onnxruntime' and summary['frames'] == 4
    assert len(os.listdir(res / 'pred_masks' / 'frames')) == 4
    rc = demo.main(['--input', str(frames), '--mask', str(tmp_path / 'mask.png'), '--output',
                    str(tmp_path / 'demo2'), '--ckpt_path', str(ckpt), '--backend',
                    'onnxruntime', '--device', 'cpu'])
    assert rc == 1 and '--backend onnxruntime needs --ckpt_path' in capsys.readouterr().err
