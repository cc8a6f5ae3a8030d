"""Golden equivalence of the training engine with upstream (golden/README.md §3, §5)."""
import numpy as np
import pytest
import torch

from networks.engines import build_engine
from tests.golden_engine import build_recipe_model, golden

RUNS = {'run_a': dict(step=0, use_prev_pred=False, shuffle=True),
        'run_b': dict(step=60000, use_prev_pred=True, shuffle=True),
        'run_c': dict(step=0, use_prev_pred=False, shuffle=False)}


@pytest.fixture(scope='module')
def fixture():
    return golden('train_deaott.npz')


@pytest.mark.parametrize('run', sorted(RUNS))
def test_training_engine(run, fixture):
    spec = RUNS[run]
    cfg, model = build_recipe_model('deaott')
    engine = build_engine(cfg.MODEL_ENGINE, 'train', aot_model=model, gpu_id=0,
                          long_term_mem_gap=cfg.TRAIN_LONG_TERM_MEM_GAP)
    # As the fixture: sub-modules in eval mode (no dropout / drop-path), engine training.
    engine.eval()
    engine.training = True
    engine.restart_engine(batch_size=2, enable_id_shuffle=spec['shuffle'])
    if spec['shuffle']:
        engine.id_shuffle_matrix = torch.from_numpy(fixture['id_shuffle_matrix'])
    logits = []
    decode = engine.decode_current_logits

    def recording_decode(output_size=None):
        out = decode(output_size)
        logits.append(engine.pred_id_logits.detach().clone())
        return out

    engine.decode_current_logits = recording_decode
    frames = torch.from_numpy(fixture['frames'])
    labels = torch.from_numpy(fixture['labels'].astype(np.int32))
    loss, masks, frame_losses, _ = engine(
        frames, labels, 2, obj_nums=[int(n) for n in fixture['obj_nums']], step=spec['step'],
        tf_board=False, use_prev_pred=spec['use_prev_pred'], enable_prev_frame=False,
        use_prev_prob=False)
    loss = torch.mean(loss)
    loss.backward()

    np.testing.assert_allclose(loss.item(), fixture[f'{run}_loss'], atol=1e-5)
    np.testing.assert_allclose(torch.stack(frame_losses).detach().numpy(),
                               fixture[f'{run}_frame_losses'], atol=1e-5)
    ours = torch.stack(logits).numpy()
    ref = fixture[f'{run}_logits_4x']
    masked = ref <= -1e9
    assert np.array_equal(ours <= -1e9, masked)
    np.testing.assert_allclose(ours[~masked], ref[~masked], atol=1e-4)
    pred = torch.stack(masks).numpy()
    clear = ~fixture[f'{run}_ambiguous']
    assert np.array_equal(pred[clear], fixture[f'{run}_pred_masks'][clear])
    assert engine.memory.num_long_term_tokens() == int(fixture[f'{run}_lt_mem_tokens'][0])

    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    names = list(fixture[f'{run}_grad_names'])
    assert sorted(grads) == sorted(names)
    for name, gsum, gabs in zip(names, fixture[f'{run}_grad_sum'], fixture[f'{run}_grad_abs_sum']):
        g = grads[name].double()
        assert abs(g.sum().item() - gsum) <= 1e-3 * gabs, name
        assert abs(g.abs().sum().item() - gabs) <= 1e-3 * gabs, name
