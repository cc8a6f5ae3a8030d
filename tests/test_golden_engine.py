"""Golden equivalence of the inference engines with upstream (golden/README.md §2, §5)."""
import numpy as np
import pytest
import torch

from tests.golden_engine import build_recipe_model, golden, run_engine

MODELS = ['deaott', 'r50_deaotl', 'aott']


def _check_logits(ours, ref):
    masked = ref <= -1e9
    assert np.array_equal(ours <= -1e9, masked), 'unused-ID channels differ'
    np.testing.assert_allclose(ours[~masked], ref[~masked], atol=1e-4, rtol=0)


@pytest.fixture(scope='module')
def inputs():
    return golden('engine_inputs_ac.npz')


@pytest.mark.parametrize('model_id', MODELS)
def test_engine_teacher_forced(model_id, inputs):
    fixture = golden(f'engine_{model_id}.npz')
    cfg, model = build_recipe_model(model_id)
    torch.set_num_threads(2)
    out = run_engine(model, cfg, inputs, fixture, teacher_forced=True)
    _check_logits(out['logits_4x'], fixture['logits_4x'])
    _check_logits(out['newobj_ref_logits_4x'], fixture['newobj_ref_logits_4x'])
    unambiguous = ~fixture['ambiguous_out']
    assert np.array_equal(out['labels_out'][unambiguous], fixture['labels_out'][unambiguous])
    assert out['lt_mem_tokens'] == list(fixture['lt_mem_tokens'])
    if model_id == 'deaott':
        np.testing.assert_allclose(out['logits_out_f1'], fixture['logits_out_f1'], atol=1e-4)


def test_engine_free_running_deaott(inputs):
    fixture = golden('engine_deaott.npz')
    cfg, model = build_recipe_model('deaott')
    out = run_engine(model, cfg, inputs, fixture, teacher_forced=False)
    agree = (out['labels_out'] == fixture['labels_out']).mean(axis=(1, 2))
    assert (agree >= 0.995).all(), agree
    assert out['lt_mem_tokens'] == list(fixture['lt_mem_tokens'])


def test_taps_deaott(inputs):
    """Intermediate tensors: projected 16x map, ID embedding, GPM output."""
    from networks.engines.identity import one_hot_mask
    fixture = golden('engine_deaott.npz')
    cfg, model = build_recipe_model('deaott')
    images = torch.from_numpy(inputs['images'])
    with torch.no_grad():
        enc0 = model.encode_image(images[0:1])
        np.testing.assert_allclose(enc0[-1].numpy(), fixture['tap_ref_enc_16x_proj'], atol=1e-4, rtol=1e-4)
        lab = torch.from_numpy(fixture['ref_label_input'].astype(np.float32))[None, None]
        id_emb = model.get_id_emb(one_hot_mask(lab, 10))
        tokens = id_emb.flatten(2).permute(2, 0, 1)
        np.testing.assert_allclose(tokens.numpy(), fixture['tap_ref_id_emb'], atol=1e-4, rtol=1e-4)
        outs, _, _ = model.LSTT_forward(enc0, [None], [None], tokens, size_2d=(11, 17))
        np.testing.assert_allclose(outs[-1].numpy(), fixture['tap_ref_lstt_out'], atol=1e-4, rtol=1e-4)
