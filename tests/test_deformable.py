"""Gated Deformable Attention against independent float64 references (docs/gda.md).

References written here, not taken from the module:
* Eq. (3): position = cell-centre reference + bounded offset, clamped to [-1, 1];
* Eq. (4): bilinear kernel sum_r max(0, 1 - |p_x - r_x|) max(0, 1 - |p_y - r_y|) z[r] with the
  continuous pixel coordinate clamped to the border (grid_sample's padding_mode='border');
* DeAOT's vanilla gated attention, softmax(Q K^T / sqrt(d)) V * U -> depthwise 5x5 -> Linear.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from networks.layers.deformable import GatedDeformableAttention


def _inputs(B, T, h, w, d_k, d_v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = h * w
    Q = torch.randn(L, B, d_k, generator=g, dtype=dtype)
    K = torch.randn(T * L, B, d_k, generator=g, dtype=dtype)
    V = torch.randn(T * L, B, d_v, generator=g, dtype=dtype)
    U = torch.rand(L, B, d_v, generator=g, dtype=dtype) + 0.5
    return Q, K, V, U


def _randomise_offsets(module, std=1.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = module.conv_offset[-1].weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * std)


# --------------------------------------------------------------------------------------------
# Naive float64 references
# --------------------------------------------------------------------------------------------

def _naive_positions(raw, scale):
    """Eq. (3). raw: (B, S, 2, H_g, W_g), channel 0 = x. Returns px, py in normalised coords."""
    B, S, _, H_g, W_g = raw.shape
    ref_x = (2.0 * np.arange(W_g) + 1.0) / W_g - 1.0
    ref_y = (2.0 * np.arange(H_g) + 1.0) / H_g - 1.0
    if scale > 0:
        dx = scale * np.tanh(raw[:, :, 0]) / W_g
        dy = scale * np.tanh(raw[:, :, 1]) / H_g
    else:
        dx = 2.0 * raw[:, :, 0] / W_g
        dy = 2.0 * raw[:, :, 1] / H_g
    px = np.clip(ref_x[None, None, None, :] + dx, -1.0, 1.0)
    py = np.clip(ref_y[None, None, :, None] + dy, -1.0, 1.0)
    return px, py


def _naive_bilinear(z, px, py):
    """Eq. (4) at one point. z: (C, h, w); px, py normalised (align_corners=False)."""
    C, h, w = z.shape
    u = min(max(((px + 1.0) * w - 1.0) / 2.0, 0.0), w - 1.0)
    v = min(max(((py + 1.0) * h - 1.0) / 2.0, 0.0), h - 1.0)
    kx = np.maximum(0.0, 1.0 - np.abs(u - np.arange(w)))
    ky = np.maximum(0.0, 1.0 - np.abs(v - np.arange(h)))
    return np.einsum('crq,r,q->c', z, ky, kx)


def _naive_sample(K, V, raw, scale, size_2d, S):
    """Sampled keys/values (B, C, T*N) computed point by point."""
    h, w = size_2d
    L = h * w
    K = K.detach().double().numpy()
    V = V.detach().double().numpy()
    raw = raw.detach().double().numpy()
    TL, B, Ck = K.shape
    T = TL // L
    Cv = V.shape[2] // 2
    ck, cv = Ck // S, Cv // S
    px, py = _naive_positions(raw, scale)
    H_g, W_g = px.shape[2:]
    N = H_g * W_g
    Ks = np.zeros((B, Ck, T * N))
    Vs = np.zeros((B, 2 * Cv, T * N))
    for b in range(B):
        for t in range(T):
            kmap = K[t * L:(t + 1) * L, b].reshape(h, w, Ck).transpose(2, 0, 1)
            vmap = V[t * L:(t + 1) * L, b].reshape(h, w, 2 * Cv).transpose(2, 0, 1)
            for s in range(S):
                ks = slice(s * ck, (s + 1) * ck)
                vis = slice(s * cv, (s + 1) * cv)
                idv = slice(Cv + s * cv, Cv + (s + 1) * cv)
                for i in range(H_g):
                    for j in range(W_g):
                        n = t * N + i * W_g + j
                        x, y = px[b, s, i, j], py[b, s, i, j]
                        Ks[b, ks, n] = _naive_bilinear(kmap[ks], x, y)
                        Vs[b, vis, n] = _naive_bilinear(vmap[vis], x, y)
                        Vs[b, idv, n] = _naive_bilinear(vmap[idv], x, y)
    return Ks, Vs


def _raw_offsets(module, Q, size_2d):
    """The offset network's raw output, regrouped to (B, S, 2, H_g, W_g)."""
    h, w = size_2d
    L, B, C = Q.shape
    S = module.groups
    q = Q.permute(1, 2, 0).reshape(B * S, C // S, h, w)
    raw = module.conv_offset(q)
    return raw.view(B, S, 2, *raw.shape[-2:])


def _naive_vanilla(module, Q, K, V, U, size_2d, num_head):
    """DeAOT's GatedPropagation (use_linear=False) in float64 with the module's tail weights."""
    h, w = size_2d
    Q, K, V, U = (x.detach().double() for x in (Q, K, V, U))
    L, B, Ck = Q.shape
    d = Ck // num_head
    E = V.shape[2]
    hid = E // num_head
    out = torch.zeros(L, B, E, dtype=torch.float64)
    for b in range(B):
        for hd in range(num_head):
            q = Q[:, b, hd * d:(hd + 1) * d] / math.sqrt(d)
            k = K[:, b, hd * d:(hd + 1) * d]
            logits = q @ k.T
            a = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            a = a / a.sum(dim=1, keepdim=True)
            out[:, b, hd * hid:(hd + 1) * hid] = a @ V[:, b, hd * hid:(hd + 1) * hid]
    out = out * U
    o2d = out.permute(1, 2, 0).reshape(B, E, h, w)
    o2d = F.conv2d(o2d, module.dw_conv.conv.weight.detach().double(), padding=2, groups=E)
    out = o2d.reshape(B, E, L).permute(2, 0, 1)
    return out @ module.projection.weight.detach().double().T + module.projection.bias.detach().double()


# --------------------------------------------------------------------------------------------
# (1) Re-sampling equals Eqs. (3)-(4)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('h,w,grid,S,T,scale,kernel', [
    (6, 8, 2, 2, 3, 2.0, 5),
    (7, 5, 2, 1, 2, 2.0, 5),
    (5, 9, 3, 2, 1, 4.0, 7),
    (4, 6, 1, 2, 2, 2.0, 3),
    (7, 7, 2, 2, 2, -1.0, 5),   # unbounded + clamp variant
])
def test_resampling_matches_naive_equations(h, w, grid, S, T, scale, kernel):
    d_att, d_vu = 16, 16                      # value width E = 32 = visual 16 + ID 16
    m = GatedDeformableAttention(d_qk=32, d_vu=d_vu, d_att=d_att, grid=grid, groups=S,
                                 kernel=kernel, offset_scale=scale).double().eval()
    _randomise_offsets(m)
    Q, K, V, U = _inputs(2, T, h, w, d_att, 2 * d_vu, dtype=torch.float64)

    with torch.no_grad():
        raw = _raw_offsets(m, Q, (h, w))
        pos = m.sampling_positions(Q, (h, w))
        Ks, Vs = m.sample_memory(K, V, pos, (h, w))
    assert raw.abs().max() > 0.5              # the offsets really move the points
    H_g, W_g = -(-h // grid), -(-w // grid)
    assert Ks.shape == (2, d_att, T * H_g * W_g) and Vs.shape == (2, 2 * d_vu, T * H_g * W_g)

    Ks_ref, Vs_ref = _naive_sample(K, V, raw, scale, (h, w), S)
    np.testing.assert_allclose(Ks.numpy(), Ks_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(Vs.numpy(), Vs_ref, rtol=0, atol=1e-10)

    # The float32 module agrees with the float64 reference to float32 rounding.
    m32 = m.float()
    with torch.no_grad():
        Q32, K32, V32 = Q.float(), K.float(), V.float()
        Ks32, Vs32 = m32.sample_memory(K32, V32, m32.sampling_positions(Q32, (h, w)), (h, w))
    np.testing.assert_allclose(Ks32.double().numpy(), Ks_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(Vs32.double().numpy(), Vs_ref, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# (2) g = 1, zero offsets == vanilla gated attention
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('num_head,kernel,no_offset', [(1, 5, False), (1, 3, False), (2, 3, True)])
def test_grid1_zero_offsets_equals_vanilla(num_head, kernel, no_offset):
    h, w, T, B = 5, 7, 2, 2
    m = GatedDeformableAttention(d_qk=256, d_vu=512, num_head=num_head, d_att=128, grid=1,
                                 groups=2, kernel=kernel, no_offset=no_offset).eval()
    Q, K, V, U = _inputs(B, T, h, w, 128 * num_head, 1024)
    with torch.no_grad():
        out, attn = m(Q, K, V, U, (h, w))
    assert attn is None
    ref = _naive_vanilla(m, Q, K, V, U, (h, w), num_head)
    assert out.shape == (h * w, B, 512)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------
# (3) g = 2, zero offsets == 2x2 average pooling
# --------------------------------------------------------------------------------------------

def test_grid2_zero_offsets_is_average_pooling():
    h, w, T, B = 6, 8, 2, 2
    Q, K, V, U = _inputs(B, T, h, w, 128, 1024)
    zero = GatedDeformableAttention(grid=2, groups=2).eval()           # zero-initialised offsets
    plain = GatedDeformableAttention(grid=2, groups=2, no_offset=True).eval()
    plain.load_state_dict(zero.state_dict(), strict=False)

    def pooled(X):  # (T*L, B, C) -> (B, C, T*N) by avg_pool2d per frame
        C = X.shape[-1]
        x = X.view(T, h, w, B, C).permute(3, 0, 4, 1, 2).reshape(B * T, C, h, w)
        x = F.avg_pool2d(x.double(), 2).view(B, T, C, -1)
        return x.permute(0, 2, 1, 3).reshape(B, C, -1)

    Kp, Vp = pooled(K), pooled(V)
    for m in (zero, plain):
        with torch.no_grad():
            Ks, Vs = m.sample_memory(K, V, m.sampling_positions(Q, (h, w)), (h, w))
        torch.testing.assert_close(Ks.double(), Kp, rtol=0, atol=1e-5)
        torch.testing.assert_close(Vs.double(), Vp, rtol=0, atol=1e-5)

    with torch.no_grad():
        torch.testing.assert_close(zero(Q, K, V, U, (h, w))[0], plain(Q, K, V, U, (h, w))[0],
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# (4) Gradients reach the offset network from a zero-initialised last conv
# --------------------------------------------------------------------------------------------

def test_gradients_reach_offset_network():
    h, w, T, B = 6, 6, 2, 2
    m = GatedDeformableAttention(grid=2, groups=2)
    first, last = m.conv_offset[0].weight, m.conv_offset[-1].weight
    assert torch.count_nonzero(last) == 0
    Q, K, V, U = _inputs(B, T, h, w, 128, 1024)
    target = torch.randn(h * w, B, 512, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)

    def step():
        opt.zero_grad()
        out, _ = m(Q, K, V, U, (h, w))
        ((out - target) ** 2).mean().backward()

    step()
    assert torch.isfinite(last.grad).all() and last.grad.abs().max() > 0
    # Behind a zero conv nothing flows further yet.
    assert first.grad is None or torch.count_nonzero(first.grad) == 0
    opt.step()
    assert torch.count_nonzero(last) > 0

    step()
    assert torch.isfinite(first.grad).all() and first.grad.abs().max() > 0
    assert torch.isfinite(m.conv_offset[0].bias.grad).all()


# --------------------------------------------------------------------------------------------
# (5) gradcheck in float64 with non-zero offsets
# --------------------------------------------------------------------------------------------

def test_gradcheck_float64():
    h, w, T, B = 4, 5, 2, 1
    m = GatedDeformableAttention(d_qk=8, d_vu=4, d_att=4, grid=2, groups=2, kernel=3,
                                 offset_scale=2.0).double().eval()
    _randomise_offsets(m, std=0.7)
    Q, K, V, U = (x.requires_grad_() for x in _inputs(B, T, h, w, 4, 8, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: m(*a, (h, w))[0], (Q, K, V, U),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)

    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()
              if n.startswith('conv_offset')}
    names = list(params)

    def f(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (Q.detach(), K.detach(),
                                                                    V.detach(), U.detach(), (h, w)))[0]
    assert torch.autograd.gradcheck(f, tuple(params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# (6) State-dict compatibility with the vanilla long-term attention
# --------------------------------------------------------------------------------------------

def test_state_dict_keys():
    vanilla = {'dw_conv.conv.weight': (1024, 1, 5, 5), 'projection.weight': (512, 1024),
               'projection.bias': (512,)}
    m = GatedDeformableAttention()
    sd = m.state_dict()
    for k, shape in vanilla.items():
        assert tuple(sd[k].shape) == shape
    extra = set(sd) - set(vanilla)
    assert extra and all(k.startswith('conv_offset.') for k in extra)
    assert tuple(sd['conv_offset.0.weight'].shape) == (64, 1, 5, 5)     # depthwise, 128/S channels
    assert tuple(sd['conv_offset.3.weight'].shape) == (2, 64, 1, 1)     # to (dx, dy), no bias
    assert 'conv_offset.3.bias' not in sd

    ckpt = {k: torch.randn(s) for k, s in vanilla.items()}
    missing, unexpected = m.load_state_dict(ckpt, strict=False)
    assert not unexpected and set(missing) == extra
    assert torch.equal(m.projection.weight, ckpt['projection.weight'])

    plain = GatedDeformableAttention(no_offset=True)
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == vanilla


# --------------------------------------------------------------------------------------------
# (7) Attention capture
# --------------------------------------------------------------------------------------------

def test_attention_capture():
    h, w, T, B = 5, 6, 3, 2
    m = GatedDeformableAttention(grid=2, groups=2).eval()
    _randomise_offsets(m, std=0.3)
    Q, K, V, U = _inputs(B, T, h, w, 128, 1024)

    with torch.no_grad():
        out_off, attn = m(Q, K, V, U, (h, w))
    assert attn is None and m.capture is None

    m.capture = {}
    with torch.no_grad():
        out_on, attn = m(Q, K, V, U, (h, w))
        _, Vs = m.sample_memory(K, V, m.sampling_positions(Q, (h, w)), (h, w))
    # Capturing takes the explicit softmax path (the map is wanted), the plain call the fused
    # scaled_dot_product_attention: the same sums, up to float rounding.
    torch.testing.assert_close(out_on, out_off, rtol=1e-5, atol=1e-6)
    n_keys = T * 3 * 3                                                  # ceil(5/2) * ceil(6/2)
    assert set(m.capture) == {'attn', 'id_out'}
    assert attn is m.capture['attn'] and attn.shape == (B, 1, h * w, n_keys)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, 1, h * w))

    # ID half of the gated output: (attn @ V_ID) * U_ID, before the DWConv and projection.
    id_ref = (attn[:, 0] @ Vs[:, 512:].transpose(1, 2)) * U[..., 512:].transpose(0, 1)
    assert m.capture['id_out'].shape == (B, h * w, 512)
    torch.testing.assert_close(m.capture['id_out'], id_ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='kernel must be odd'):
        GatedDeformableAttention(kernel=4)
    with pytest.raises(ValueError, match='groups'):
        GatedDeformableAttention(groups=3)
    m = GatedDeformableAttention()
    Q, K, V, U = _inputs(1, 1, 4, 4, 128, 1024)
    with pytest.raises(ValueError, match='h\\*w=20'):
        m(Q, K, V, U, (4, 5))
