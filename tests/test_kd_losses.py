"""Distillation losses: CKA invariants and float64 references, DIST relation losses, combination."""
import numpy as np
import pytest
import torch

from kd.losses import (DistillationLoss, attention_cka_loss, attention_kl_loss,
                       inter_relation_loss, intra_relation_loss, linear_cka, valid_channels)

SHAPES = [(120, 16, 24), (30, 7, 7), (12, 50, 33), (9, 40, 5)]  # (n, p, q): n > p and p > n


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def correlated(n, p, q, seed=0):
    """x and y sharing a latent factor, so that CKA is well inside (0, 1)."""
    z = rand(n, 4, seed=seed)
    x = z @ rand(4, p, seed=seed + 1) + 0.5 * rand(n, p, seed=seed + 2)
    y = z @ rand(4, q, seed=seed + 3) + 0.5 * rand(n, q, seed=seed + 4) + 3.0
    return x, y


def orthogonal(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return torch.from_numpy(q * np.sign(np.diag(r))).float()


# ------------------------------------------------------------------ float64 references

def ref_cka(x, y):
    """Kornblith's Gram-matrix definition: centred kernels, HSIC ratio, all in float64."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k = h @ (x @ x.T) @ h
    l = h @ (y @ y.T) @ h
    return np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def ref_pearson_distance(u, v):
    u = u - u.mean()
    v = v - v.mean()
    return 1.0 - (u @ v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8)


def ref_softmax(z):
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def ref_relations(student, teacher, valid, inter_min=3):
    """Per sample: keep only the valid channels, softmax them, then correlate."""
    s = student.detach().double().numpy()
    t = teacher.detach().double().numpy()
    v = valid.numpy()
    inter_terms, intra_terms = [], []
    for b in range(s.shape[0]):
        chans = np.flatnonzero(v[b])
        ps = ref_softmax(s[b, chans].reshape(len(chans), -1))  # (c, HW)
        pt = ref_softmax(t[b, chans].reshape(len(chans), -1))
        if len(chans) >= inter_min:
            inter_terms += [ref_pearson_distance(ps[:, i], pt[:, i]) for i in range(ps.shape[1])]
        if len(chans) >= 2:
            intra_terms += [ref_pearson_distance(ps[j], pt[j]) for j in range(len(chans))]
    inter = float(np.mean(inter_terms)) if inter_terms else 0.0
    intra = float(np.mean(intra_terms)) if intra_terms else 0.0
    return inter, intra


def make_logits(B=4, C=6, H=7, W=9, seed=0):
    s = rand(B, C, H, W, seed=seed) * 2.0
    t = 0.6 * s + rand(B, C, H, W, seed=seed + 1) * 1.5  # related but not equal
    return s, t


# Valid counts 4, 3 (non-contiguous: object 2 gone), 2 (single object) and 1 (background only).
VALID = torch.tensor([[1, 1, 1, 1, 0, 0],
                      [1, 1, 0, 1, 0, 0],
                      [1, 1, 0, 0, 0, 0],
                      [1, 0, 0, 0, 0, 0]], dtype=torch.bool)


# ------------------------------------------------------------------ linear CKA

@pytest.mark.parametrize('n,p,q', SHAPES)
def test_cka_of_identical_inputs_is_one(n, p, q):
    x = rand(n, p, seed=n + p)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, x + 5.0).item() == pytest.approx(1.0, abs=1e-5)  # column shift


@pytest.mark.parametrize('n,p,q', SHAPES)
@pytest.mark.parametrize('form', ['feature', 'gram'])
def test_cka_matches_float64_gram_reference(n, p, q, form):
    x, y = correlated(n, p, q, seed=n)
    got = linear_cka(x, y, form=form)
    assert got.dtype == torch.float32 and got.shape == ()
    ref = ref_cka(x.numpy(), y.numpy())
    assert 0.05 < ref < 0.999
    assert got.item() == pytest.approx(ref, abs=2e-5)


@pytest.mark.parametrize('n,p,q', SHAPES)
def test_cka_feature_and_gram_forms_agree(n, p, q):
    x, y = correlated(n, p, q, seed=2 * n)
    xb = torch.stack([x, x.flip(0)])  # batched (2, n, p)
    yb = torch.stack([y, y])
    f, g = linear_cka(xb, yb, form='feature'), linear_cka(xb, yb, form='gram')
    assert f.shape == (2,)
    torch.testing.assert_close(f, g, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(linear_cka(xb, yb), f, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize('n,p,q', SHAPES)
def test_cka_invariant_to_isotropic_scaling_and_symmetric(n, p, q):
    x, y = correlated(n, p, q, seed=3 * n)
    base = linear_cka(x, y).item()
    assert linear_cka(x * 1e3, y).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(x, y * 1e-3).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(y, x).item() == pytest.approx(base, abs=1e-6)


@pytest.mark.parametrize('n,p,q', SHAPES)
def test_cka_invariant_to_orthogonal_maps_on_either_side(n, p, q):
    x, y = correlated(n, p, q, seed=4 * n)
    base = linear_cka(x, y).item()
    assert linear_cka(x @ orthogonal(p, 1), y).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(x, y @ orthogonal(q, 2)).item() == pytest.approx(base, abs=1e-5)
    # ...but not to an anisotropic scaling, so the invariances above are not trivial.
    aniso = torch.logspace(-2, 1, p)
    assert abs(linear_cka(x * aniso, y).item() - base) > 1e-3


def test_cka_batched_values_match_float64_across_the_unit_interval():
    """Batched CKA equals the float64 Gram definition sample by sample, over values that
    span [0, 1]: 1 for a rotated and scaled copy, inside (0, 1) for correlated pairs, lower
    for independent ones. (A range check alone could not fail: the value is clamped.)"""
    for n, p, _ in SHAPES:
        base = rand(n, p, seed=p)
        pairs = [(base, 2.5 * base @ orthogonal(p, seed=n))]                 # CKA = 1
        pairs += [correlated(n, p, p, seed=s) for s in range(3)]            # in (0, 1)
        pairs += [(rand(n, p, seed=90 + s), rand(n, p, seed=95 + s)) for s in range(2)]
        x = torch.stack([a for a, _ in pairs])
        y = torch.stack([b for _, b in pairs])
        got = linear_cka(x, y)
        want = torch.tensor([ref_cka(a, b) for a, b in pairs], dtype=torch.float32)
        assert got.shape == (len(pairs),)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert abs(got[0].item() - 1.0) < 1e-5
        assert bool(((got[1:4] > 0.05) & (got[1:4] < 0.999)).all())
        if n > 2 * p:  # independent samples: CKA well below the correlated ones
            assert float(got[4:].max()) < float(got[1:4].min())


@pytest.mark.parametrize('n,p,q', SHAPES)
def test_cka_gradients_are_finite_and_match_float64(n, p, q):
    x, y = correlated(n, p, q, seed=5 * n)
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    linear_cka(xg, yg).backward()

    def cka64(a, b):  # Gram definition in torch float64, differentiated by autograd
        h = torch.eye(a.shape[0], dtype=torch.float64) - 1.0 / a.shape[0]
        k, l = h @ a @ a.T @ h, h @ b @ b.T @ h
        return (k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum())

    x64, y64 = x.double().requires_grad_(True), y.double().requires_grad_(True)
    cka64(x64, y64).backward()
    for got, ref in ((xg.grad, x64.grad), (yg.grad, y64.grad)):
        assert torch.isfinite(got).all()
        scale = ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 1e-3 * scale + 1e-7


def test_cka_of_constant_input_is_zero_with_finite_gradients():
    x = torch.full((20, 6), 0.1, requires_grad=True)  # constant columns: CKA undefined
    y = rand(20, 4).requires_grad_(True)
    c = linear_cka(x, y)
    assert c.item() == 0.0
    c.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_cka_is_float32_under_autocast_and_for_half_inputs():
    x, y = correlated(200, 64, 48, seed=7)
    ref = ref_cka(x.numpy(), y.numpy())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = linear_cka(x, y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, abs=1e-5)
    xh, yh = x.to(torch.bfloat16), y.to(torch.bfloat16)
    ref_h = ref_cka(xh.float().numpy(), yh.float().numpy())
    assert linear_cka(xh, yh).item() == pytest.approx(ref_h, abs=1e-5)


def test_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError, match='same rows'):
        linear_cka(rand(10, 3), rand(11, 3))


# ------------------------------------------------------------------ DIST relation losses

@pytest.mark.parametrize('inter_min', [3, 2])
def test_relation_losses_match_float64_reference(inter_min):
    s, t = make_logits()
    inter = inter_relation_loss(s, t, VALID, min_channels=inter_min)
    intra = intra_relation_loss(s, t, VALID)
    assert inter.dtype == intra.dtype == torch.float32
    ref_inter, ref_intra = ref_relations(s, t, VALID, inter_min)
    assert inter.item() == pytest.approx(ref_inter, abs=1e-5)
    assert intra.item() == pytest.approx(ref_intra, abs=1e-5)
    assert 0.1 < ref_inter < 1.9 and 0.1 < ref_intra < 1.9


def test_relation_losses_are_zero_for_identical_logits():
    s, _ = make_logits()
    assert inter_relation_loss(s, s, VALID).item() == pytest.approx(0.0, abs=1e-6)
    assert intra_relation_loss(s, s, VALID).item() == pytest.approx(0.0, abs=1e-6)


def test_padded_channels_change_nothing():
    s, t = make_logits()
    pad = ~VALID[:, :, None, None]
    garbage_s = s.masked_fill(pad, 0.0) + pad * rand(*s.shape, seed=9) * 50.0
    garbage_s[3, 2] = float('nan')
    garbage_s[0, 5] = float('inf')
    garbage_t = t.masked_fill(pad, -1e10)  # DeAOT's fill for unused IDs
    garbage_t[1, 2] = 1e10
    s1, s2 = s.clone().requires_grad_(True), garbage_s.clone().requires_grad_(True)
    l1 = inter_relation_loss(s1, t, VALID) + intra_relation_loss(s1, t, VALID)
    l2 = inter_relation_loss(s2, garbage_t, VALID) + intra_relation_loss(s2, garbage_t, VALID)
    assert l2.item() == pytest.approx(l1.item(), abs=1e-6)
    l1.backward()
    l2.backward()
    assert torch.isfinite(s2.grad).all()
    assert (s2.grad[pad.expand_as(s2)] == 0).all()
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-7, rtol=1e-5)


def test_single_object_clips_are_finite_with_finite_gradients():
    s, t = make_logits(B=3, C=11)
    valid = valid_channels([1, 1, 1], 11)
    s[1, 1] = s[1, 0]  # an exactly uniform student softmax (zero-norm centred vector)
    t[2, 1] = t[2, 0]  # and a uniform teacher
    sg = s.clone().requires_grad_(True)
    inter = inter_relation_loss(sg, t, valid)
    intra = intra_relation_loss(sg, t, valid)
    assert inter.item() == 0.0  # the degenerate two-channel inter term is left out
    ref_inter, ref_intra = ref_relations(s, t, valid)
    assert intra.item() == pytest.approx(ref_intra, abs=1e-5)
    (inter + intra).backward()
    assert torch.isfinite(sg.grad).all()
    assert sg.grad[0].abs().sum() > 0  # intra still teaches single-object samples
    # Kept when asked: two-channel inter gives 0 or 2 per pixel, still finite.
    kept = inter_relation_loss(s, t, valid, min_channels=2)
    assert kept.item() == pytest.approx(ref_relations(s, t, valid, 2)[0], abs=1e-5)


def test_relation_losses_are_float32_for_half_inputs_under_autocast():
    s, t = make_logits()
    sh, th = s.to(torch.bfloat16), t.to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inter = inter_relation_loss(sh, th, VALID)
        intra = intra_relation_loss(sh, th, VALID)
    assert inter.dtype == intra.dtype == torch.float32
    ref_inter, ref_intra = ref_relations(sh.float(), th.float(), VALID)
    assert inter.item() == pytest.approx(ref_inter, abs=1e-5)
    assert intra.item() == pytest.approx(ref_intra, abs=1e-5)


def test_relation_losses_reject_mismatched_inputs():
    s, t = make_logits()
    with pytest.raises(ValueError, match='resize'):
        inter_relation_loss(s, t[..., :5], VALID)
    with pytest.raises(ValueError, match='valid must be'):
        intra_relation_loss(s, t, VALID[:, :5])


def test_valid_channels():
    v = valid_channels([2, 0, 5], 6)
    assert v.tolist() == [[True, True, True, False, False, False],
                          [True, False, False, False, False, False],
                          [True] * 6]


# ------------------------------------------------------------------ attention losses

def test_attention_cka_loss_is_mean_of_per_sample_one_minus_cka():
    n, ps, pt = 50, 24, 40  # widths differ between student and teacher
    s = torch.stack([correlated(n, ps, pt, seed=i)[0] for i in range(3)])
    t = torch.stack([correlated(n, ps, pt, seed=i)[1] for i in range(3)])
    got = attention_cka_loss(s, t)
    ref = np.mean([1.0 - ref_cka(s[i].numpy(), t[i].numpy()) for i in range(3)])
    assert got.item() == pytest.approx(ref, abs=2e-5)
    # (B, heads, n, keys) maps: heads are concatenated along the feature axis.
    s4 = s.reshape(3, n, 2, 12).permute(0, 2, 1, 3)
    assert attention_cka_loss(s4, t).item() == pytest.approx(got.item(), abs=1e-6)
    with pytest.raises(ValueError, match='query'):
        attention_cka_loss(s, t[:, :40])


def softmax_rows(*shape, seed):
    return torch.softmax(rand(*shape, seed=seed) * 2.0, dim=-1)


def test_attention_kl_loss_matches_reference_and_requires_equal_shapes():
    s, t = softmax_rows(2, 1, 30, 45, seed=1), softmax_rows(2, 1, 30, 45, seed=2)
    got = attention_kl_loss(s, t)
    s64, t64 = s.double().numpy(), t.double().numpy()
    ref = (t64 * (np.log(t64) - np.log(s64))).sum(-1).mean()
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert attention_kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match='same keys'):
        attention_kl_loss(s[..., :20], t)


# ------------------------------------------------------------------ combined loss

def test_distillation_loss_combines_terms_with_lambda():
    s, t = make_logits()
    sa = torch.stack([correlated(36, 16, 32, seed=i)[0] for i in range(4)])
    ta = torch.stack([correlated(36, 16, 32, seed=i)[1] for i in range(4)])
    ref_inter, ref_intra = ref_relations(s, t, VALID)
    ref_att = np.mean([1.0 - ref_cka(sa[i].numpy(), ta[i].numpy()) for i in range(4)])

    total, parts = DistillationLoss()(s, t, VALID, sa, ta)
    assert total.item() == pytest.approx(ref_inter + ref_intra + 1.5 * ref_att, abs=5e-5)
    assert parts['att'].item() == pytest.approx(ref_att, abs=2e-5)

    dist_only, parts0 = DistillationLoss(lambda_att=0.0)(s, t, VALID)  # no attention needed
    assert dist_only.item() == pytest.approx(ref_inter + ref_intra, abs=2e-5)
    assert parts0['att'].item() == 0.0
    none, _ = DistillationLoss(attention_loss='none')(s, t, VALID, sa, ta)
    assert none.item() == pytest.approx(dist_only.item(), abs=1e-7)

    inter_att, _ = DistillationLoss(lambda_att=2.0, intra_weight=0.0)(s, t, VALID, sa, ta)
    assert inter_att.item() == pytest.approx(ref_inter + 2.0 * ref_att, abs=5e-5)

    with pytest.raises(ValueError, match='student_attn'):
        DistillationLoss()(s, t, VALID)
    with pytest.raises(ValueError, match='attention_loss'):
        DistillationLoss(attention_loss='mse')


def test_distillation_loss_kl_option_and_teacher_gets_no_gradient():
    s, t = make_logits()
    sa, ta = softmax_rows(4, 1, 20, 30, seed=3), softmax_rows(4, 1, 20, 30, seed=4)
    sg, tg = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    sag, tag = sa.clone().requires_grad_(True), ta.clone().requires_grad_(True)
    total, parts = DistillationLoss(attention_loss='kl')(sg, tg, VALID, sag, tag)
    assert parts['att'].item() == pytest.approx(attention_kl_loss(sa, ta).item(), rel=1e-6)
    ref_inter, ref_intra = ref_relations(s, t, VALID)
    assert total.item() == pytest.approx(ref_inter + ref_intra + 1.5 * parts['att'].item(),
                                         abs=5e-5)
    total.backward()
    assert tg.grad is None and tag.grad is None
    assert torch.isfinite(sg.grad).all() and torch.isfinite(sag.grad).all()
