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


@pytest.mark.parametrize('cap', [None, 2])
def test_engines_run_gda_with_gaps_and_caps(cap):
    torch.manual_seed(0)
    cfg = DefaultEngineConfig('t', 'deaots_gda')
    model = build_vos_model(cfg.MODEL_VOS, cfg).eval()
    engine = build_engine(cfg.MODEL_ENGINE, 'eval', aot_model=model, long_term_mem_gap=2,
                          short_term_mem_skip=1, max_long_term_frames=cap)
    frames = torch.randn(7, 1, 3, 65, 97)
    mask = torch.zeros(1, 1, 65, 97)
    mask[..., 10:40, 20:60] = 1
    mask[..., 45:60, 70:90] = 2
    tokens = []
    with torch.no_grad():
        engine.add_reference_frame(frames[0], mask, obj_nums=[2], frame_step=0)
        for t in range(1, 7):
            engine.match_propogate_one_frame(frames[t])
            logits = engine.decode_current_logits((65, 97))
            assert torch.isfinite(logits[:, :3]).all()
            engine.update_memory(logits.argmax(1, keepdim=True).float())
            tokens.append(engine.num_long_term_tokens)
    per_frame = 5 * 7
    expected = [1, 2, 2, 3, 3, 4] if cap is None else [1, 2, 2, 2, 2, 2]
    assert tokens == [n * per_frame for n in expected]
    steps = engine.aot_engines[0].memory.long_term_steps
    assert steps[-1] == 0  # the reference frame is always kept


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
