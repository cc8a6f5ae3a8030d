"""GDA inside the DeAOT model: equivalence with vanilla, golden fixture, checkpoints,
engines (issue 3)."""
import logging

import numpy as np
import pytest
import torch

from configs.default import DefaultEngineConfig
from networks.engines import build_engine
from networks.layers.attention import GatedPropagation
from networks.layers.deformable import GatedDeformableAttention
from networks.models import build_vos_model, load_vos_model
from utils.checkpoint import CheckpointMismatchError, save_network


def test_gda_g1_zero_offsets_equals_vanilla_module():
    torch.manual_seed(0)
    vanilla = GatedPropagation(256, 512, 1, use_linear=False, d_att=128).eval()
    gda = GatedDeformableAttention(256, 512, 1, d_att=128, grid=1, groups=2, kernel=3).eval()
    missing = gda.load_state_dict(vanilla.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith('conv_offset') for k in missing)
    h, w, T, B = 7, 9, 3, 2
    q = torch.randn(h * w, B, 128)
    k = torch.randn(T * h * w, B, 128)
    v = torch.randn(T * h * w, B, 1024)
    u = torch.randn(h * w, B, 1024)
    with torch.no_grad():
        ref, _ = vanilla(q, k, v, u, (h, w))
        out, _ = gda(q, k, v, u, (h, w))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_deaott_gda_g1_reproduces_golden_engine():
    """A GDA student with g=1 and zero offsets carrying deaott's weights is deaott."""
    from tests.golden_engine import golden, run_engine
    from tests.golden_weights import recipe_for_module
    fixture = golden('engine_deaott.npz')
    inputs = golden('engine_inputs_ac.npz')
    cfg = DefaultEngineConfig('golden', 'deaott_gda')
    cfg.MODEL_GDA_GRID = 1
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    vanilla_cfg = DefaultEngineConfig('golden', 'deaott')
    vanilla = build_vos_model(vanilla_cfg.MODEL_VOS, vanilla_cfg)
    weights = recipe_for_module(vanilla)
    missing = model.load_state_dict(weights, strict=False).missing_keys
    assert missing and all('conv_offset' in k for k in missing)
    out = run_engine(model.eval(), cfg, inputs, fixture, teacher_forced=True)
    ref = fixture['logits_4x']
    masked = ref <= -1e9
    np.testing.assert_allclose(out['logits_4x'][~masked], ref[~masked], atol=1e-4)
    assert out['lt_mem_tokens'] == list(fixture['lt_mem_tokens'])


class _PooledMemoryAttention(torch.nn.Module):
    """Vanilla long-term attention over memory frames 2x2-average-pooled (the g = 2 reference:
    at zero offsets GDA samples every memory map at the centres of its 2x2 pixel blocks)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, u, size_2d):
        h, w = size_2d

        def pool(x):  # (T*h*w, B, C) -> (T*(h/2)*(w/2), B, C), frame-major, row-major
            T, B, C = x.shape[0] // (h * w), x.shape[1], x.shape[2]
            m = x.view(T, h, w, B, C).permute(0, 3, 4, 1, 2).reshape(T * B, C, h, w)
            m = torch.nn.functional.avg_pool2d(m, 2)
            return m.view(T, B, C, -1).permute(0, 3, 1, 2).reshape(-1, B, C)

        return self.attn(q, pool(k), pool(v), u, size_2d)

    # The propagation layers' long-term protocol (prepared memory, then attend).
    def prepare_memory(self, k, v, size_2d):
        return k, v

    def attend(self, q, mem, u, size_2d):
        return self.forward(q, *mem, u, size_2d)


def _run_clip(model, frames, mask, labels=None):
    """Eval engine over a clip; memory written from ``labels`` (or the model's own argmax).
    Returns the per-frame logits and the labels written."""
    engine = build_engine('deaotengine', 'eval', aot_model=model, long_term_mem_gap=2,
                          short_term_mem_skip=1)
    size = tuple(frames.shape[-2:])
    logits_all, written = [], []
    with torch.no_grad():
        engine.add_reference_frame(frames[0], mask, obj_nums=[2], frame_step=0)
        for t in range(1, frames.shape[0]):
            engine.match_propogate_one_frame(frames[t])
            logits = engine.decode_current_logits(size)
            label = logits.argmax(1, keepdim=True).float() if labels is None else labels[t - 1]
            engine.update_memory(label)
            logits_all.append(logits[:, :3])
            written.append(label)
    return logits_all, written


def test_deaott_gda_g2_zero_offsets_equals_vanilla_over_pooled_memory():
    """A GDA student at g = 2 with zero offsets, carrying deaott's weights, is deaott whose
    long-term attention reads 2x2-average-pooled memory (reference pass and every stored
    frame), through the whole model and engine; and it is not plain deaott."""
    from tests.golden_weights import recipe_for_module
    torch.manual_seed(0)
    vanilla_cfg = DefaultEngineConfig('t', 'deaott')
    vanilla = build_vos_model(vanilla_cfg.MODEL_VOS, vanilla_cfg).eval()
    # The golden fixtures' weights: with the default init every token of a random frame gets
    # nearly the same query, attention is uniform and pooling could not be told apart.
    vanilla.load_state_dict(recipe_for_module(vanilla), strict=True)
    cfg = DefaultEngineConfig('t', 'deaott_gda')
    assert cfg.MODEL_GDA_GRID == 2 and cfg.MODEL_ENGINE == vanilla_cfg.MODEL_ENGINE
    gda = build_vos_model(cfg.MODEL_VOS, cfg).eval()
    missing = gda.load_state_dict(vanilla.state_dict(), strict=False).missing_keys
    assert missing and all('conv_offset' in k for k in missing)
    for layer in gda.LSTT.layers:  # zero offsets: the offset net's last conv is zero
        assert not layer.long_term_attn.conv_offset[-1].weight.any()

    H, W = 113, 145  # 8 x 10 tokens at stride 16: 2 divides both, so blocks are whole
    frames = torch.rand(6, 1, 3, H, W) * 2 - 1
    mask = torch.zeros(1, 1, H, W)
    mask[..., 10:60, 20:80] = 1
    mask[..., 70:100, 90:130] = 2

    plain_logits, _ = _run_clip(vanilla, frames, mask)
    for layer in vanilla.LSTT.layers:
        layer.long_term_attn = _PooledMemoryAttention(layer.long_term_attn)
    ref_logits, labels = _run_clip(vanilla, frames, mask)
    gda_logits, _ = _run_clip(gda, frames, mask, labels=labels)

    for got, ref in zip(gda_logits, ref_logits):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    gap = max((a - b).abs().max().item() for a, b in zip(gda_logits, plain_logits))
    assert gap > 5e-3, 'pooling made no difference: the test would not see a wrong grid'


def test_vanilla_checkpoint_loads_into_gda_with_only_offsets_new(tmp_path, caplog):
    cfg = DefaultEngineConfig('t', 'deaott')
    vanilla = build_vos_model(cfg.MODEL_VOS, cfg)
    path = save_network(vanilla, 100, str(tmp_path))
    with caplog.at_level(logging.INFO):
        _, model, report = load_vos_model('deaott_gda', path)
    assert report['missing'] == [] and report['unexpected'] == []
    assert report['new'] and all('long_term_attn.conv_offset' in k for k in report['new'])
    assert any('offset' in r.message and 'deaott_gda' in r.message for r in caplog.records)
    sd = model.state_dict()
    for k, v in vanilla.state_dict().items():
        assert torch.equal(sd[k], v), k
    # The other way round is a real mismatch: strict loading names the offset keys.
    gda_path = save_network(model, 200, str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match='conv_offset'):
        load_vos_model('deaott', gda_path)


def test_engines_run_gda_with_gaps_and_caps():
    """GDA through the eval engine with a memory gap, with and without a cap: the capped run
    predicts exactly as the uncapped one while both hold the same frames, differs once the
    cap drops one, and keeps the reference frame."""
    from tests.golden_weights import recipe_for_module
    torch.manual_seed(0)
    cfg = DefaultEngineConfig('t', 'deaots_gda')
    model = build_vos_model(cfg.MODEL_VOS, cfg).eval()
    # Weights under which memory matters (with the default init every token of a random
    # frame looks alike, and attention over 2 or 3 such frames gives the same mean).
    model.load_state_dict(recipe_for_module(model), strict=True)
    frames = torch.randn(7, 1, 3, 65, 97)
    mask = torch.zeros(1, 1, 65, 97)
    mask[..., 10:40, 20:60] = 1
    mask[..., 45:60, 70:90] = 2

    def run(cap, labels=None):
        engine = build_engine(cfg.MODEL_ENGINE, 'eval', aot_model=model, long_term_mem_gap=2,
                              short_term_mem_skip=1, long_term_mem_max=cap)
        tokens, logits_all, written = [], [], []
        with torch.no_grad():
            engine.add_reference_frame(frames[0], mask, obj_nums=[2], frame_step=0)
            for t in range(1, 7):
                engine.match_propogate_one_frame(frames[t])
                logits = engine.decode_current_logits((65, 97))
                label = logits.argmax(1, keepdim=True).float() if labels is None \
                    else labels[t - 1]
                engine.update_memory(label)
                tokens.append(engine.num_long_term_tokens)
                logits_all.append(logits[:, :3])
                written.append(label)
        return tokens, logits_all, written, engine.aot_engines[0].memory.long_term_steps

    tokens, free, labels, _ = run(None)
    tokens_cap, capped, _, steps = run(2, labels)   # same memory labels as the uncapped run
    per_frame = 5 * 7   # GDA keys per stored frame: ceil(5 / 2) x ceil(13 / 2) at g = 2
    assert tokens == [n * per_frame for n in [1, 2, 2, 3, 3, 4]]
    assert tokens_cap == [n * per_frame for n in [1, 2, 2, 2, 2, 2]]
    # Frames 1..4 read the same memory (at most 2 stored frames) in both runs.
    for t in range(4):
        assert torch.equal(capped[t], free[t]), t
    # Frame 5 reads 3 frames uncapped but 2 capped: a cap that did nothing would fail here.
    assert (capped[4] - free[4]).abs().max() > 1e-4
    assert steps[-1] == 0 and len(steps) == 2   # the reference frame is always kept


def test_gda_training_step_reaches_offset_net():
    torch.manual_seed(0)
    cfg = DefaultEngineConfig('t', 'deaott_gda')
    cfg.TRAIN_LSTT_DROPPATH = 0.0
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    engine = build_engine(cfg.MODEL_ENGINE, 'train', aot_model=model,
                          long_term_mem_gap=cfg.TRAIN_LONG_TERM_MEM_GAP)
    engine.restart_engine(batch_size=1, enable_id_shuffle=True)
    frames = torch.randn(5, 3, 65, 65)
    labels = torch.zeros(5, 1, 65, 65, dtype=torch.long)
    labels[:, :, 10:40, 10:40] = 1
    loss, *_ = engine(frames, labels, 1, obj_nums=[1], step=0)
    loss.backward()
    last = model.LSTT.layers[0].long_term_attn.conv_offset[3].weight
    assert last.grad is not None and torch.isfinite(last.grad).all() and last.grad.abs().sum() > 0
