"""Upstream training losses against a float64 numpy reference and the golden training fixture."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from networks.layers.loss import CrossEntropyLoss, SoftJaccardLoss, SoftJaccordLoss
from tests.conftest import shared_path

IGNORE = 255


# ------------------------------------------------------------------ float64 references (numpy)

def ref_pixel_ce(logits, labels):
    """logits (C, H, W), labels (H, W) -> per-pixel CE (H*W,), 0 on ignored pixels."""
    z = logits.astype(np.float64).reshape(logits.shape[0], -1)
    y = labels.reshape(-1).astype(np.int64)
    zmax = z.max(0)
    lse = zmax + np.log(np.exp(z - zmax).sum(0))
    out = np.zeros(y.shape, np.float64)
    for i in range(y.size):
        if y[i] != IGNORE:
            out[i] = lse[i] - z[y[i], i]
    return out


def ref_topk_ce(logits, labels, top_k, hard_step, step):
    losses = ref_pixel_ce(logits, labels)
    hw = losses.size  # ignored pixels stay in the pixel count
    frac = min(1.0, step / (hard_step + 1e-5))
    k = int((frac * top_k + (1.0 - frac)) * hw)
    return np.sort(losses)[::-1][:k].mean()


def ref_mean_ce(logits, labels):
    losses = ref_pixel_ce(logits, labels)
    return losses[labels.reshape(-1) != IGNORE].mean()


def ref_jaccard(logits, labels):
    z = logits.astype(np.float64).reshape(logits.shape[0], -1)
    y = labels.reshape(-1).astype(np.int64)
    p = np.exp(z - z.max(0))
    p /= p.sum(0)
    keep = y != IGNORE
    p, y = p[:, keep], y[keep]
    terms = []
    for c in range(z.shape[0]):
        g = (y == c).astype(np.float64)
        if g.sum() == 0:
            continue
        tp = (p[c] * g).sum()
        terms.append(1.0 - tp / (tp + (p[c] * (1 - g)).sum() + ((1 - p[c]) * g).sum() + 1e-6))
    return float(np.mean(terms)) if terms else 0.0


def make_batch(gen, B=2, C=4, H=13, W=11, ignore_frac=0.1, obj_nums=None):
    logits = torch.randn(B, C, H, W, generator=gen) * 2.0
    top = [C - 1] * B if obj_nums is None else obj_nums
    labels = torch.stack([torch.randint(0, t + 1, (H, W), generator=gen) for t in top])
    ignore = torch.rand(B, H, W, generator=gen) < ignore_frac
    labels[ignore] = IGNORE
    return logits, labels[:, None].to(torch.uint8)


# ------------------------------------------------------------------ cross-entropy

@pytest.mark.parametrize('step', [0, 1, 7000, 25000, 49999.5, 50000, 60000, 10 ** 7])
def test_topk_ce_matches_reference_over_the_annealing(step):
    gen = torch.Generator().manual_seed(1)
    logits, labels = make_batch(gen, B=3, H=17, W=19)
    loss = CrossEntropyLoss(0.15, 50000)(logits, labels, step)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    for b in range(3):
        ref = ref_topk_ce(logits[b].numpy(), labels[b, 0].numpy(), 0.15, 50000, step)
        assert loss[b].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_topk_count_is_upstream_formula_with_ignored_pixels_in_the_total():
    # Pixel losses are distinct, so the mean of the top k shifts by a lot if k is off by one.
    H, W = 10, 10
    logits = torch.zeros(1, 2, H, W)
    logits[0, 1] = torch.linspace(-4, 4, H * W).reshape(H, W)
    labels = torch.zeros(1, H, W, dtype=torch.long)
    labels[0, :3] = IGNORE  # 30 ignored pixels: loss 0 but still counted in H*W
    ce = CrossEntropyLoss(0.15, 1000)
    pix = ref_pixel_ce(logits[0].numpy(), labels[0].numpy())
    for step, k in [(0, 100), (500, int((0.5 * 0.15 + 0.5) * 100)), (2000, 15)]:
        assert ce.num_kept_pixels(H * W, step) == k
        ref = np.sort(pix)[::-1][:k].mean()
        assert ce(logits, labels, step).item() == pytest.approx(ref, rel=1e-6)
    # At step 0 every pixel is kept: ignored pixels dilute the mean over all H*W pixels.
    assert ce(logits, labels, 0).item() == pytest.approx(pix.sum() / 100, rel=1e-6)


def test_plain_ce_is_mean_over_non_ignored_pixels():
    gen = torch.Generator().manual_seed(2)
    logits, labels = make_batch(gen, ignore_frac=0.3)
    loss = CrossEntropyLoss(None)(logits, labels)
    for b in range(2):
        ref = ref_mean_ce(logits[b].numpy(), labels[b, 0].numpy())
        assert loss[b].item() == pytest.approx(ref, rel=1e-5)


def test_ce_needs_step_for_topk_and_validates_fraction():
    logits, labels = make_batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='step'):
        CrossEntropyLoss(0.15, 100)(logits, labels)
    with pytest.raises(ValueError, match='top_k_percent_pixels'):
        CrossEntropyLoss(1.5, 100)


# ------------------------------------------------------------------ soft Jaccard

def test_jaccard_matches_reference_with_ignored_pixels():
    gen = torch.Generator().manual_seed(3)
    logits, labels = make_batch(gen, B=3, C=5, ignore_frac=0.25)
    loss = SoftJaccordLoss()(logits, labels)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    for b in range(3):
        ref = ref_jaccard(logits[b].numpy(), labels[b, 0].numpy())
        assert loss[b].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_jaccard_skips_absent_classes_including_background():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 9, 9, generator=gen)
    labels = torch.full((2, 9, 9), 3, dtype=torch.long)
    labels[0, :4] = 1  # sample 0: classes 1 and 3; no background, class 2 absent
    labels[1, :, :2] = IGNORE  # sample 1: class 3 only
    loss = SoftJaccordLoss()(logits, labels)
    for b in range(2):
        ref = ref_jaccard(logits[b].numpy(), labels[b].numpy())
        assert loss[b].item() == pytest.approx(ref, rel=1e-5)
    # Averaging over absent classes too would change the value by a lot.
    p = torch.softmax(logits[1].double(), 0)
    all_classes = np.mean([1 - (p[c] * (labels[1] == c)).sum().item() /
                           (p[c].sum().item() + (labels[1] == c).sum().item()
                            - (p[c] * (labels[1] == c)).sum().item() + 1e-6) for c in range(4)])
    assert abs(loss[1].item() - all_classes) > 1e-2


def test_losses_with_every_pixel_ignored_are_zero_and_finite():
    logits = torch.randn(1, 3, 5, 5, requires_grad=True)
    labels = torch.full((1, 1, 5, 5), IGNORE, dtype=torch.uint8)
    total = (CrossEntropyLoss(None)(logits, labels) + CrossEntropyLoss(0.15, 10)(logits, labels, 3)
             + SoftJaccardLoss()(logits, labels))
    assert total.item() == 0.0
    total.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------ batches, call forms, dtype

def test_batch_with_different_object_counts_equals_per_element_cut():
    gen = torch.Generator().manual_seed(5)
    obj_nums = [3, 1, 2]
    logits, labels = make_batch(gen, B=3, C=11, H=15, W=14, obj_nums=obj_nums)
    # Padded channels hold arbitrary (large) values: obj_nums must exclude them from the softmax.
    for b, n in enumerate(obj_nums):
        logits[b, n + 1:] = 5.0 + 3.0 * torch.randn(11 - n - 1, 15, 14, generator=gen)
    ce, jac = CrossEntropyLoss(0.15, 100), SoftJaccardLoss()
    got_ce = ce(logits, labels, 40, obj_nums=obj_nums)
    got_jac = jac(logits, labels, obj_nums=obj_nums)
    x = logits.clone().requires_grad_(True)
    (ce(x, labels, 40, obj_nums=obj_nums) + jac(x, labels, obj_nums=obj_nums)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for b, n in enumerate(obj_nums):
        assert (x.grad[b, n + 1:] == 0).all()  # channels beyond the object count are out
    per_logits = [logits[b:b + 1, :n + 1] for b, n in enumerate(obj_nums)]
    per_labels = [labels[b] for b in range(3)]  # (1, H, W), upstream's list form
    torch.testing.assert_close(ce(per_logits, per_labels, 40), got_ce)
    torch.testing.assert_close(jac(per_logits, per_labels, 40), got_jac)
    for b, n in enumerate(obj_nums):
        cut = logits[b, :n + 1].numpy()
        lab = labels[b, 0].numpy()
        assert got_ce[b].item() == pytest.approx(ref_topk_ce(cut, lab, 0.15, 100, 40), rel=1e-5)
        assert got_jac[b].item() == pytest.approx(ref_jaccard(cut, lab), rel=1e-5, abs=1e-6)


def test_bad_labels_and_shapes_raise_clear_errors():
    logits = torch.randn(2, 3, 6, 6)
    labels = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    labels[1, 0, 0, 0] = 5
    with pytest.raises(ValueError, match=r'ids \[5\]'):
        SoftJaccordLoss()(logits, labels)
    labels[1, 0, 0, 0] = 2
    with pytest.raises(ValueError, match=r'ids \[2\]'):
        CrossEntropyLoss(None)(logits, labels, obj_nums=[2, 1])
    with pytest.raises(ValueError, match='do not match'):
        CrossEntropyLoss(None)(logits, torch.zeros(2, 1, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match='integer'):
        SoftJaccordLoss()(logits, labels.float())


def test_float32_inside_under_autocast_and_for_half_inputs():
    gen = torch.Generator().manual_seed(6)
    logits, labels = make_batch(gen, C=5, H=20, W=20)
    low = logits.to(torch.bfloat16)
    ce, jac = CrossEntropyLoss(0.15, 100), SoftJaccardLoss()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = [ce(low, labels, 30), jac(low, labels)]
    for g in got:
        assert g.dtype == torch.float32
    for b in range(2):
        exact = low[b].float().numpy()
        lab = labels[b, 0].numpy()
        assert got[0][b].item() == pytest.approx(ref_topk_ce(exact, lab, 0.15, 100, 30), rel=1e-5)
        assert got[1][b].item() == pytest.approx(ref_jaccard(exact, lab), rel=1e-5)


def test_gradients_are_finite_and_match_float64_autograd():
    gen = torch.Generator().manual_seed(7)
    logits, labels = make_batch(gen, C=4, H=8, W=8)
    x = logits.clone().requires_grad_(True)
    (0.5 * CrossEntropyLoss(None)(x, labels) + 0.5 * SoftJaccardLoss()(x, labels)).sum().backward()
    # Independent float64 autograd of the same definitions.
    x64 = logits.double().requires_grad_(True)
    y = labels[:, 0].long()
    keep = (y != IGNORE)
    total = 0.0
    for b in range(2):
        lp = torch.log_softmax(x64[b], 0)
        yy = y[b].clamp_max(3)
        ce = -(lp.gather(0, yy[None])[0] * keep[b]).sum() / keep[b].sum()
        p = lp.exp() * keep[b]
        terms = []
        for c in range(4):
            g = ((y[b] == c) & keep[b]).double()
            if g.sum() > 0:
                tp = (p[c] * g).sum()
                terms.append(1 - tp / (tp + (p[c] * (1 - g)).sum() + ((1 - p[c]) * g).sum()
                                       + 1e-6))
        total = total + 0.5 * ce + 0.5 * torch.stack(terms).mean()
    total.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_alias():
    assert SoftJaccardLoss is SoftJaccordLoss


# ------------------------------------------------------------------ golden fixture (upstream)

@pytest.mark.parametrize('run', ['run_a', 'run_b', 'run_c'])
def test_frame_losses_match_upstream_training_fixture(run):
    """Upstream's per-frame loss 0.5 * top-k CE + 0.5 * soft Jaccard on its own logits."""
    import json
    data = np.load(shared_path('reference', 'golden', 'train_deaott.npz'))
    meta = json.loads(str(data['meta']))
    cfg = meta['runs'][run]
    hard_step = cfg['TRAIN_HARD_MINING_RATIO'] * cfg['TRAIN_TOTAL_STEPS']
    ce = CrossEntropyLoss(cfg['TRAIN_TOP_K_PERCENT_PIXELS'], hard_step)
    jac = SoftJaccordLoss()
    obj_nums = [int(n) for n in data['obj_nums']]
    B = len(obj_nums)
    logits_4x = torch.from_numpy(data[f'{run}_logits_4x'])  # (5, B, 11, 53, 53)
    labels = torch.from_numpy(data['labels'])  # (5 * B, 1, 209, 209), frame-major
    expected = data[f'{run}_frame_losses']  # (5, B)
    size = labels.shape[-2:]
    for f in range(5):
        # The engine upsamples to the label size (align_corners=True for DeAOT-T) first.
        up = F.interpolate(logits_4x[f], size=size, mode='bilinear', align_corners=True)
        lab = labels[f * B:(f + 1) * B].long()
        got = 0.5 * ce(up, lab, cfg['step'], obj_nums=obj_nums) + 0.5 * jac(up, lab,
                                                                             obj_nums=obj_nums)
        np.testing.assert_allclose(got.double().numpy(), expected[f], rtol=0, atol=1e-5,
                                   err_msg=f'{run} frame {f}')
