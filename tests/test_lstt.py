"""AOT's Long Short-Term Transformer against upstream's state-dict layout and against
float64 references written here from upstream's formulas (no code under test reused)."""
import math

import pytest
import torch

from networks.engines.memory import MemoryEntry
from networks.layers.lstt import (LongShortTermTransformer, LongShortTermTransformerBlock,
                                  MultiheadAttention, MultiheadLocalAttention)
from tests.conftest import shared_path

D = 256
HEADS = 8

# MODEL_LSTT_NUM of every AOT model id (upstream configs/models/*.py).
AOT_LAYERS = {'aott': 1, 'aots': 2, 'aotb': 3, 'aotl': 3, 'r50_aotl': 3, 'r101_aotl': 3,
              'swinb_aotl': 3}


# ---------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------
def randomise_(module, seed=0):
    """Fill every parameter with non-trivial values (LayerNorm/GroupNorm away from 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            u = torch.rand(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1 and name.endswith('weight'):
                val = 1 + (u - 0.5) * 0.4
            elif p.dim() == 1:
                val = (u - 0.5) * 0.4
            else:
                fan_in = math.prod(p.shape[1:])
                val = (u - 0.5) * 2 * math.sqrt(3 / fan_in)
            p.copy_(val.to(p.dtype))
    return module


def lin(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def softmax(x, dim):
    e = torch.exp(x - x.max(dim, keepdim=True).values)
    return e / e.sum(dim, keepdim=True)


def to_2d(x, size):
    h, w = size
    L, B, C = x.shape
    out = torch.empty(B, C, h, w, dtype=x.dtype)
    for y in range(h):
        for xx in range(w):
            out[:, :, y, xx] = x[y * w + xx]
    return out


def to_seq(x):
    B, C, h, w = x.shape
    return torch.stack([x[:, :, y, xx] for y in range(h) for xx in range(w)], 0)


def ref_global(mod, Q, K, V, heads):
    """Upstream MultiheadAttention: per head softmax((Q/sqrt(c)) K^T) V, then projection."""
    if mod.use_linear:
        Q, K, V = lin(Q, mod.linear_Q), lin(K, mod.linear_K), lin(V, mod.linear_V)
    Lq, B, C = Q.shape
    c = C // heads
    out = torch.empty(Lq, B, C, dtype=Q.dtype)
    for b in range(B):
        for g in range(heads):
            s = slice(g * c, (g + 1) * c)
            a = softmax((Q[:, b, s] / math.sqrt(c)) @ K[:, b, s].T, dim=1)
            out[:, b, s] = a @ V[:, b, s]
    return lin(out, mod.projection)


def ref_local(mod, q, k, v, heads, max_dis=7, dilation=1):
    """Upstream MultiheadLocalAttentionV2 with explicit loops over the window."""
    B, C, h, w = q.shape
    c = C // heads
    W = 2 * max_dis + 1
    R = max_dis * dilation
    pad = lambda t: torch.nn.functional.pad(t, (R, R, R, R))  # zero keys/values outside
    kp, vp = pad(k), pad(v)
    ys = torch.arange(h).view(h, 1)
    xs = torch.arange(w).view(1, w)
    wk = mod.relative_emb_k.weight.view(heads, W * W, c)      # grouped 1x1 conv
    bk = mod.relative_emb_k.bias.view(heads, W * W)
    logits = torch.empty(B, heads, W * W, h, w, dtype=q.dtype)
    valid = torch.empty(W * W, h, w, dtype=torch.bool)
    shifted_v = []
    qh = q.view(B, heads, c, h, w)
    for i in range(W):
        for j in range(W):
            n = i * W + j
            dy, dx = (i - max_dis) * dilation, (j - max_dis) * dilation
            ks = kp[:, :, R + dy:R + dy + h, R + dx:R + dx + w].reshape(B, heads, c, h, w)
            vs = vp[:, :, R + dy:R + dy + h, R + dx:R + dx + w]
            shifted_v.append(vs.reshape(B, heads, c, h, w))
            rel = torch.einsum('gc,bgcyx->bgyx', wk[:, n], qh) + bk[:, n].view(1, heads, 1, 1)
            logits[:, :, n] = (qh / math.sqrt(c) * ks).sum(2) + rel
            valid[n] = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
    logits = logits.masked_fill(~valid, float('-inf'))
    attn = softmax(logits, dim=2)
    out = torch.zeros(B, heads, c, h, w, dtype=q.dtype)
    for n in range(W * W):
        a = attn[:, :, n].unsqueeze(2)
        out += a * (shifted_v[n] + mod.relative_emb_v[:, :, n].view(1, heads, c, 1, 1))
    return lin(to_seq(out.reshape(B, C, h, w)), mod.projection)


def ref_ffn(blk, x, size):
    """Linear -> GroupNorm(32) -> exact GELU -> depthwise 5x5 (no bias) -> Linear."""
    f = to_2d(lin(x, blk.linear1), size)
    B, C, h, w = f.shape
    gn = blk.activation.gn
    G = gn.num_groups
    fg = f.view(B, G, -1)
    mu = fg.mean(-1, keepdim=True)
    var = ((fg - mu) ** 2).mean(-1, keepdim=True)
    f = ((fg - mu) / torch.sqrt(var + gn.eps)).view(B, C, h, w)
    f = f * gn.weight.view(1, C, 1, 1) + gn.bias.view(1, C, 1, 1)
    f = 0.5 * f * (1 + torch.erf(f / math.sqrt(2)))
    fp = torch.nn.functional.pad(f, (2, 2, 2, 2))
    kern = blk.activation.conv.weight.view(C, 5, 5)
    out = torch.zeros_like(f)
    for i in range(5):
        for j in range(5):
            out += kern[:, i, j].view(1, C, 1, 1) * fp[:, :, i:i + h, j:j + w]
    return lin(to_seq(out), blk.linear2)


def ref_block(blk, tgt, size, heads, id_emb=None, pos=None, lt=None, st=None):
    """Upstream v1 block: pre-LN self-attention (pos on Q/K), pre-LN long+short-term
    attention (Q = K = linear_Q(x), V = linear_V(x + id) for the reference pass), FFN."""
    x = layer_norm(tgt, blk.norm1)
    qk = x if pos is None else x + pos
    tgt = tgt + ref_global(blk.self_attn, qk, qk, x, heads)
    x = layer_norm(tgt, blk.norm2)
    Q = lin(x, blk.linear_Q)
    if id_emb is not None:
        gK, gV = Q, lin(x + id_emb, blk.linear_V)
        sK, sV = to_2d(gK, size), to_2d(gV, size)
    else:
        (gK, gV), (sK, sV) = lt, st
    tgt = tgt + ref_global(blk.long_term_attn, Q, gK, gV, heads) \
        + ref_local(blk.short_term_attn, to_2d(Q, size), sK, sV, heads)
    tgt = tgt + ref_ffn(blk, layer_norm(tgt, blk.norm3), size)
    return tgt, (Q, x), (gK, gV)


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < tol, f'max |diff| {err:.3g} >= {tol}'


# ---------------------------------------------------------------------------------------
# 1. state-dict layout
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('model_id', list(AOT_LAYERS))
def test_state_dict_matches_upstream_dump(model_id):
    lines = shared_path('reference', 'state_dicts', f'sd_{model_id}.txt').read_text().splitlines()
    expected = []
    for line in lines:
        if line.startswith('LSTT.'):
            key, rest = line[len('LSTT.'):].split(' ', 1)
            shape, kind = rest.rsplit(' ', 1)
            assert kind == 'param'
            expected.append((key, [int(s) for s in shape.strip('[]').split(',') if s.strip()]))
    model = LongShortTermTransformer(AOT_LAYERS[model_id], D, HEADS, HEADS,
                                     intermediate_norm=True, return_intermediate=True)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same keys, shapes and order
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in expected]
    assert not list(model.buffers())


# ---------------------------------------------------------------------------------------
# 2. attention modules
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('use_linear', [True, False])
def test_global_attention_matches_reference(use_linear):
    mod = randomise_(MultiheadAttention(D, HEADS, use_linear=use_linear)).double().eval()
    Q = torch.randn(35, 2, D, dtype=torch.float64)
    K = torch.randn(70, 2, D, dtype=torch.float64)
    V = torch.randn(70, 2, D, dtype=torch.float64)
    with torch.no_grad():
        expected = ref_global(mod, Q, K, V, HEADS)
        out_sdpa, attn_none = mod(Q, K, V)
        out_explicit, attn = mod(Q, K, V, need_weights=True)
    assert attn_none is None and attn.shape == (2, HEADS, 35, 70)
    close(out_sdpa, expected)
    close(out_explicit, expected)
    close(attn.sum(-1), torch.ones(2, HEADS, 35, dtype=torch.float64))


def test_global_attention_sdpa_float32_matches_explicit():
    mod = randomise_(MultiheadAttention(D, HEADS)).eval()
    Q, K = torch.randn(60, 2, D), torch.randn(90, 2, D)
    with torch.no_grad():
        close(mod(Q, K, K)[0], mod(Q, K, K, need_weights=True)[0], tol=1e-5)


@pytest.mark.parametrize('size,dilation', [((5, 6), 1), ((18, 21), 1), ((12, 13), 2)])
def test_local_attention_matches_reference(size, dilation):
    # (5, 6): window larger than the image; (18, 21): crosses the 16x16 tiles.
    mod = randomise_(MultiheadLocalAttention(D, HEADS, dilation=dilation)).double().eval()
    q, k, v = (torch.randn(2, D, *size, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out, attn = mod(q, k, v, need_weights=True)
        expected = ref_local(mod, q, k, v, HEADS, dilation=dilation)
    close(out, expected)
    assert attn.shape == (2, HEADS, 225, size[0] * size[1])


def test_local_attention_half_precision_close_to_float32():
    mod = randomise_(MultiheadLocalAttention(D, HEADS)).eval()
    q, k, v = (torch.randn(1, D, 9, 11) for _ in range(3))
    with torch.no_grad():
        ref, _ = mod(q, k, v)
        out, _ = mod.bfloat16()(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------------------------------
# 3. one block, reference pass and propagation pass
# ---------------------------------------------------------------------------------------
SIZE = (7, 9)
L = SIZE[0] * SIZE[1]
B = 2


def _block():
    return randomise_(LongShortTermTransformerBlock(D, HEADS, HEADS)).double().eval()


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_block_reference_pass_matches_reference():
    blk = _block()
    tgt, id_emb, pos = _x(L, B, D), _x(L, B, D), _x(L, B, D)
    with torch.no_grad():
        out, curr, ref = blk(tgt, None, None, curr_id_emb=id_emb, self_pos=pos, size_2d=SIZE)
        exp_out, (exp_k, exp_v), (exp_gk, exp_gv) = ref_block(blk, tgt, SIZE, HEADS,
                                                              id_emb=id_emb, pos=pos)
    close(out, exp_out)
    close(curr.key, exp_k)
    close(curr.value, exp_v)
    close(ref.key, exp_gk)
    close(ref.value, exp_gv)
    assert curr.id_value is None and ref.id_value is None


def test_block_propagation_pass_matches_reference():
    blk = _block()
    tgt, pos = _x(L, B, D), _x(L, B, D)
    lt = MemoryEntry(_x(2 * L, B, D), _x(2 * L, B, D))        # two stored frames
    st = MemoryEntry(_x(B, D, *SIZE), _x(B, D, *SIZE))
    with torch.no_grad():
        out, curr, ref = blk(tgt, lt, st, self_pos=pos, size_2d=SIZE)
        exp_out, (exp_k, exp_v), _ = ref_block(blk, tgt, SIZE, HEADS, pos=pos,
                                               lt=(lt.key, lt.value), st=(st.key, st.value))
    assert ref is None
    close(out, exp_out)
    close(curr.key, exp_k)
    close(curr.value, exp_v)


def test_block_position_embedding_only_moves_self_attention():
    blk = _block()
    tgt, id_emb = _x(L, B, D), _x(L, B, D)
    with torch.no_grad():
        a = blk(tgt, None, None, curr_id_emb=id_emb, self_pos=None, size_2d=SIZE)[0]
        b = ref_block(blk, tgt, SIZE, HEADS, id_emb=id_emb, pos=None)[0]
        c = blk(tgt, None, None, curr_id_emb=id_emb, self_pos=_x(L, B, D), size_2d=SIZE)[0]
    close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_block_rejects_bad_input():
    blk = LongShortTermTransformerBlock(D, HEADS, HEADS).eval()
    with pytest.raises(ValueError, match='memory'):
        blk(torch.randn(L, 1, D), None, None, size_2d=SIZE)
    with pytest.raises(ValueError, match='tokens'):
        blk(torch.randn(L + 1, 1, D), None, None, curr_id_emb=torch.randn(L + 1, 1, D),
            size_2d=SIZE)


# ---------------------------------------------------------------------------------------
# 4. memory writing: fuse_key_value_id
# ---------------------------------------------------------------------------------------
def test_fuse_key_value_id():
    blk = _block()
    tgt, id_emb = _x(L, B, D), _x(L, B, D)
    with torch.no_grad():
        _, curr, ref = blk(tgt, None, None, curr_id_emb=id_emb, size_2d=SIZE)
        fused = blk.fuse_key_value_id(curr, id_emb)
    assert fused.key is curr.key                                # K reused, not recomputed
    close(fused.value, (curr.value + id_emb) @ blk.linear_V.weight.T + blk.linear_V.bias)
    assert fused.id_value is None
    # The reference pass attends to exactly the entry a memory write would store.
    assert torch.equal(fused.value, ref.value) and torch.equal(fused.key, ref.key)


def test_propagation_with_fused_memory_equals_reference_pass():
    """Attending to the frame's own fused K/V as memory reproduces the reference pass."""
    blk = _block()
    tgt, id_emb = _x(L, B, D), _x(L, B, D)
    with torch.no_grad():
        out_ref, curr, _ = blk(tgt, None, None, curr_id_emb=id_emb, size_2d=SIZE)
        mem = blk.fuse_key_value_id(curr, id_emb)
        mem2d = MemoryEntry(to_2d(mem.key, SIZE), to_2d(mem.value, SIZE))
        out_prop, _, _ = blk(tgt, mem, mem2d, size_2d=SIZE)
    close(out_prop, out_ref)


# ---------------------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('intermediate_norm,return_intermediate',
                         [(True, True), (False, True), (True, False)])
def test_stack_outputs_and_norms(intermediate_norm, return_intermediate):
    stack = randomise_(LongShortTermTransformer(
        2, D, HEADS, HEADS, intermediate_norm=intermediate_norm,
        return_intermediate=return_intermediate)).double().eval()
    tgt, id_emb, pos = _x(L, B, D), _x(L, B, D), _x(L, B, D)
    with torch.no_grad():
        outs, currs, refs = stack(tgt, None, None, curr_id_emb=id_emb, self_pos=pos,
                                  size_2d=SIZE)
        x0, c0, r0 = stack.layers[0](tgt, None, None, id_emb, pos, SIZE)
        x1, c1, r1 = stack.layers[1](x0, None, None, id_emb, pos, SIZE)
        # propagation pass with per-layer memories from the reference pass
        lts = [stack.layers[i].fuse_key_value_id(c, id_emb) for i, c in enumerate(currs)]
        sts = [e.map(lambda t: to_2d(t, SIZE)) for e in lts]
        tgt2 = _x(L, B, D)
        outs2, _, refs2 = stack(tgt2, lts, sts, self_pos=pos, size_2d=SIZE)
        y0 = stack.layers[0](tgt2, lts[0], sts[0], None, pos, SIZE)[0]
        y1 = stack.layers[1](y0, lts[1], sts[1], None, pos, SIZE)[0]
    norms = stack.decoder_norms
    assert len(norms) == (2 if intermediate_norm else 1)
    exp_last = layer_norm(x1, norms[-1])
    if return_intermediate:
        exp = [layer_norm(x0, norms[0]) if intermediate_norm else x0, exp_last]
        exp2 = [layer_norm(y0, norms[0]) if intermediate_norm else y0, layer_norm(y1, norms[-1])]
    else:
        exp, exp2 = [exp_last], [layer_norm(y1, norms[-1])]
    assert len(outs) == len(exp) and len(outs2) == len(exp2)
    for o, e in zip(outs + outs2, exp + exp2):
        close(o, e)
    for got, want in ((currs[0], c0), (currs[1], c1), (refs[0], r0), (refs[1], r1)):
        close(got.key, want.key)
        close(got.value, want.value)
    assert refs2 == [None, None]


def test_droppath_schedule():
    def rates(**kw):
        return [blk.droppath.drop_prob for blk in LongShortTermTransformer(3, **kw).layers]
    assert rates(droppath=0.1) == [0.1, 0.1, 0.1]
    assert rates(droppath=0.1, droppath_scaling=True) == pytest.approx([0.0, 0.05, 0.1])
    single = LongShortTermTransformer(1, droppath=0.1, droppath_scaling=True)
    assert single.layers[0].droppath.drop_prob == 0.0


def test_training_backward_reaches_every_used_parameter():
    stack = LongShortTermTransformer(2, D, HEADS, HEADS, return_intermediate=True).train()
    tgt, id_emb = torch.randn(L, 1, D), torch.randn(L, 1, D)
    outs, currs, _ = stack(tgt, None, None, curr_id_emb=id_emb, size_2d=SIZE)
    lts = [layer.fuse_key_value_id(c, id_emb) for layer, c in zip(stack.layers, currs)]
    sts = [e.map(lambda t: to_2d(t, SIZE)) for e in lts]
    outs2, _, _ = stack(torch.randn(L, 1, D), lts, sts, size_2d=SIZE)
    sum(o.square().mean() for o in outs + outs2).backward()
    missing = [n for n, p in stack.named_parameters() if p.grad is None]
    assert missing == ['mask_token']
    assert all(torch.isfinite(p.grad).all() for n, p in stack.named_parameters()
               if p.grad is not None)
