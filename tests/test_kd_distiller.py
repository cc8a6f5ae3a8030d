"""Distillation: frozen teacher, the distillation step, KD configs, ablation switches, and an
end-to-end ``tools/train.py --exp_name kd_stage1`` run whose student ``tools/eval.py`` loads.

Models are tiny: MobileNetV2 DeAOTs on 65x65 crops (5x5 tokens), batch 2, 3-4 frames. Their
weights come from the golden recipe (tests/golden_weights.py): PyTorch's default init makes a
random MobileNetV2 with frozen BN collapse to spatially constant features, which would make
every attention tensor constant and the checks below vacuous.
"""
import argparse
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs.default import build_config
from kd import (KD_DEFAULTS, RANDOM_TEACHER, Distiller, Teacher, add_kd_arguments,
                apply_kd_arguments, build_distiller, build_teacher, clip_from_batch, kd_settings)
from kd.distiller import resample_tokens
from kd.teacher import split_clip_embeddings
from networks.engines import build_engine
from networks.models import build_vos_model, load_vos_model
from tests.golden_weights import recipe_for_module
from utils.checkpoint import save_network

H = 65  # crop: 5x5 tokens at stride 16, 17x17 logits at stride 4


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


# ------------------------------------------------------------------------------------------
# helpers



def record_long_term_inputs(module, sink):
    """Append ``(Q, K, V, U, size_2d)`` of every long-term attention pass of ``module`` to
    ``sink``, as the propagation layer feeds it: ``prepare_memory(K, V)`` once per memory
    write, then ``attend(Q, prepared, U)`` per pass. Returns a function that undoes it.
    """
    prepared = {}
    prepare, attend = module.prepare_memory, module.attend

    def recording_prepare(K, V, size_2d):
        mem = prepare(K, V, size_2d)
        prepared[id(mem)] = (mem, K.detach().clone(), V.detach().clone())  # keeps ids unique
        return mem

    def recording_attend(Q, mem, U, size_2d):
        _, K, V = prepared[id(mem)]
        sink.append((Q.detach().clone(), K, V, U.detach().clone(), size_2d))
        return attend(Q, mem, U, size_2d)

    module.prepare_memory, module.attend = recording_prepare, recording_attend

    def undo():
        del module.prepare_memory, module.attend
    return undo


def kd_cfg(model_id='deaott_gda', **fields):
    cfg = build_config('kd_stage1', 'kdtest', model_id)
    cfg.TRAIN_LSTT_DROPPATH = 0.0  # keeps runs comparable without re-seeding drop-path
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def recipe_model(model_id, seed, cfg=None):
    """A model with the golden-recipe weights (non-degenerate features), in eval mode."""
    cfg = cfg if cfg is not None else kd_cfg(model_id)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    model.load_state_dict(recipe_for_module(model, seed), strict=True)
    return model.eval()


def make_distiller(student='deaott_gda', teacher='deaots', student_seed=7, teacher_seed=5,
                   teacher_model=None, **fields):
    """Student + recipe teacher wired as build_distiller does (without a checkpoint file)."""
    fields.setdefault('KD_TEACHER', teacher)
    fields.setdefault('KD_TEACHER_LAYER', {'deaott': 1, 'deaots': 2}.get(teacher, 3))
    cfg = kd_cfg(student, **fields)
    s = kd_settings(cfg)
    if teacher_model is None:
        teacher_model = recipe_model(teacher, teacher_seed)
    t = Teacher(teacher_model, layer=s.teacher_layer, tensor=s.att_tensor,
                capture=s.uses_attention, long_term_mem_gap=s.teacher_mem_gap)
    return Distiller(recipe_model(student, student_seed, cfg), t, cfg)


def make_batch(seed, B=2, T=3, obj_nums=None, absent=()):
    """A collated batch of moving ellipses on textured backgrounds, labels for every frame.

    ``absent``: ``(sample, object)`` pairs drawn nowhere (counted in obj_num, never visible).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:H].astype(np.float32)
    imgs = np.zeros((T, B, 3, H, H), np.float32)
    labels = np.zeros((T, B, 1, H, H), np.int64)
    counts = []
    for b in range(B):
        n = int(obj_nums[b]) if obj_nums is not None else int(rng.integers(1, 4))
        counts.append(n)
        bg = rng.normal(0, 0.3, (3, 1, 1)) + 0.3 * np.sin(xx / rng.uniform(3, 8)
                                                          + rng.uniform(0, 6))[None]
        objs = [(rng.uniform(14, H - 14, 2), rng.uniform(6, 13, 2), rng.normal(0, 1.2, 3),
                 rng.uniform(-3, 3, 2)) for _ in range(n)]
        for t in range(T):
            img = np.broadcast_to(bg, (3, H, H)).copy()
            for k, (c, r, col, v) in enumerate(objs):
                if (b, k + 1) in absent:
                    continue
                cy, cx = c + v * t
                inside = ((yy - cy) / r[0]) ** 2 + ((xx - cx) / r[1]) ** 2 <= 1
                img[:, inside] = col[:, None]
                labels[t, b, 0][inside] = k + 1
            imgs[t, b] = img + rng.normal(0, 0.05, img.shape)
    as_t = torch.from_numpy
    return {'ref_img': as_t(imgs[0]), 'prev_img': as_t(imgs[1]),
            'curr_img': [as_t(x) for x in imgs[2:]],
            'ref_label': as_t(labels[0]), 'prev_label': as_t(labels[1]),
            'curr_label': [as_t(x) for x in labels[2:]],
            'meta': {'obj_num': torch.tensor(counts), 'seq_name': [f'clip{seed}_{b}'
                                                                   for b in range(B)]}}


def run(distiller, batch, step=0, seed=0, **kwargs):
    torch.manual_seed(seed)
    return distiller.step_clip(*clip_from_batch(batch), step=step, **kwargs)


# ------------------------------------------------------------------------------------------
# float64 references (independent of kd.losses)


def ref_pearson_distance(u, v):
    u, v = u - u.mean(), v - v.mean()
    return 1.0 - (u @ v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8)


def ref_softmax(z, axis=0):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def ref_cka(x, y):
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def ref_frame_loss(rec, obj_nums, lam, att_loss):
    """``L_inter + L_intra + lam * L_att`` of one frame, from the valid channels only."""
    s_all = rec['student_logits'].double().numpy()
    t_all = rec['teacher_logits'].double().numpy()
    inter, intra = [], []
    for b, n in enumerate(obj_nums):
        s = ref_softmax(s_all[b, :n + 1].reshape(n + 1, -1))   # (C_valid, HW)
        t = ref_softmax(t_all[b, :n + 1].reshape(n + 1, -1))
        if n + 1 >= 3:
            inter.append(np.mean([ref_pearson_distance(s[:, i], t[:, i])
                                  for i in range(s.shape[1])]))
        intra += [ref_pearson_distance(s[c], t[c]) for c in range(n + 1)]
    total = (np.mean(inter) if inter else 0.0) + np.mean(intra)
    if att_loss == 'none' or lam == 0:
        return total
    sa = rec['student_attention'].double().numpy()
    ta = rec['teacher_attention'].double().numpy()
    if att_loss == 'cka':
        terms = []
        for b in range(sa.shape[0]):
            x = sa[b] if sa.ndim == 3 else sa[b].transpose(1, 0, 2).reshape(sa.shape[2], -1)
            y = ta[b] if ta.ndim == 3 else ta[b].transpose(1, 0, 2).reshape(ta.shape[2], -1)
            terms.append(1.0 - ref_cka(x, y))
        att = np.mean(terms)
    else:
        att = np.mean(np.sum(ta * (np.log(ta) - np.log(np.maximum(sa, 1e-12))), -1))
    return total + lam * att


# ------------------------------------------------------------------------------------------
# acceptance: frozen teacher, learning student, no ground truth


def test_teacher_is_frozen_and_the_student_learns_over_ten_steps():
    d = make_distiller()
    teacher, student = d.teacher, d.model
    recipe = recipe_for_module(teacher.model, 5)
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    named = list(d.named_trainable_parameters())
    # No weight decay: a parameter moves only if its gradient does.
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.0)
    # The teacher is outside everything the trainer touches.
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for _, p in named}
    assert not teacher_ids & {id(p) for p in d.engine.parameters()}
    assert not any(k.startswith('teacher') for k in d.engine.state_dict())

    d.train()
    for step in range(10):
        loss, logs = d(make_batch(step), step)
        assert torch.isfinite(loss) and loss.requires_grad
        opt.zero_grad()
        loss.backward()
        # Every student parameter takes part (DDP runs without find_unused_parameters).
        assert all(p.grad is not None for _, p in named)
        opt.step()
        assert set(logs) >= {'loss', 'kd_inter', 'kd_intra', 'kd_att', 'kd_disagree'}
        assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())

    assert not teacher.training and not teacher.model.training
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for key, value in teacher.model.state_dict().items():  # parameters and buffers
        assert torch.equal(value, recipe[key]), key
    changed = [n for n, p in named if not torch.equal(p.detach(), before_student[n])]
    assert len(changed) == len(named), sorted({n for n, _ in named} - set(changed))


def test_loss_never_reads_ground_truth_beyond_the_reference_frame():
    d = make_distiller()
    d.train()
    batch = make_batch(3, T=4)
    gen = torch.Generator().manual_seed(1)
    poisoned = dict(batch)
    poisoned['prev_label'] = torch.randint(0, 256, batch['prev_label'].shape, generator=gen)
    poisoned['curr_label'] = [torch.randint(0, 256, x.shape, generator=gen)
                              for x in batch['curr_label']]
    stripped = {k: v for k, v in batch.items() if k not in ('prev_label', 'curr_label')}

    results = []
    for b in (batch, poisoned, stripped):
        torch.manual_seed(0)
        loss, logs = d(b, step=5)
        results.append((loss.detach(), logs))
    for loss, logs in results[1:]:
        assert torch.equal(loss, results[0][0])
        for key in results[0][1]:
            assert torch.equal(logs[key], results[0][1][key]), key

    # Control: the reference mask *is* read, so changing it changes the loss.
    moved = dict(batch)
    moved['ref_label'] = torch.roll(batch['ref_label'], shifts=9, dims=-1)
    torch.manual_seed(0)
    assert not torch.equal(d(moved, step=5)[0].detach(), results[0][0])


# ------------------------------------------------------------------------------------------
# the step's wiring


@pytest.mark.parametrize('student,teacher,layer,att_loss,tensor,lam', [
    ('deaott_gda', 'deaots', 2, 'cka', 'id_out', 1.5),   # the paper's recipe (teacher's last GPM)
    ('deaott_gda', 'deaots', 1, 'cka', 'attn', 0.7),     # softmax maps over different key sets
    ('deaott', 'deaott', 1, 'kl', 'attn', 1.5),          # KL ablation: vanilla student
])
def test_loss_matches_a_float64_reference_over_valid_channels(student, teacher, layer, att_loss,
                                                              tensor, lam):
    d = make_distiller(student, teacher, KD_TEACHER_LAYER=layer, KD_ATT_LOSS=att_loss,
                       KD_ATT_TENSOR=tensor, KD_LAMBDA=lam)
    d.train()
    # The attention the reference uses is recomputed in float64 from the inputs of the two
    # long-term attentions (recorded as the layers feed them), not taken from the capture
    # hook under test.
    t_attn = d.teacher.model.LSTT.layers[layer - 1].long_term_attn
    s_attn = d.model.LSTT.layers[d.settings.student_layer - 1].long_term_attn
    calls = {t_attn: [], s_attn: []}
    hooks = [record_long_term_inputs(m, calls[m]) for m in calls]
    # Sample 0: one object (no inter term); sample 1: three, object 3 absent from every frame.
    obj_nums = [1, 3]
    batch = make_batch(11, T=4, obj_nums=obj_nums, absent={(1, 3)})
    try:
        loss, logs, records = run(d, batch, return_frames=True)
    finally:
        for undo in hooks:
            undo()
    assert len(records) == 3
    for module, key in ((t_attn, 'teacher_attention'), (s_attn, 'student_attention')):
        assert len(calls[module]) == 4   # the reference pass, then frames 1..3
        for rec, args in zip(records, calls[module][1:]):
            want = ref_attention_from_inputs(module, *args)[tensor]
            torch.testing.assert_close(rec[key].double(), want, rtol=1e-4, atol=1e-5)
            rec[key] = want
    expected = np.mean([ref_frame_loss(r, obj_nums, lam, att_loss) for r in records])
    assert abs(loss.item() - expected) <= 1e-4 * max(1.0, abs(expected))
    assert logs['kd_att'].item() > 1e-3  # the attention term is really there
    s_att = records[0]['student_attention']
    if tensor == 'id_out':
        assert s_att.shape == (2, 25, 512)
    else:
        n_keys = 9 if student.endswith('_gda') else 25  # GDA samples a 3x3 grid of 5x5
        assert s_att.shape == (2, 1, 25, n_keys)


def test_padded_channel_content_does_not_matter():
    d = make_distiller()
    d.engine.eval()
    batch = make_batch(4, obj_nums=[1, 2])
    loss_ref, _ = run(d, batch)
    original = d.teacher.engine.decode_current_logits

    def garbage_in_padding(*args, **kwargs):
        logits = original(*args, **kwargs)
        ids = torch.arange(logits.shape[1]).view(1, -1, 1, 1)
        counts = torch.tensor([1, 2]).view(-1, 1, 1, 1)
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)) * 5
        return torch.where(ids > counts, noise, logits)

    d.teacher.engine.decode_current_logits = garbage_in_padding
    loss_garbage, _ = run(d, batch)
    assert torch.equal(loss_ref, loss_garbage)


def test_self_distillation_pairs_frames_layers_and_channels():
    """A student that *is* the teacher (same weights, eval mode) has zero loss: frames,
    memory labels, channel order and the chosen layer all line up."""
    teacher_model = recipe_model('deaots', 5)
    d = make_distiller('deaots', 'deaots', teacher_model=copy.deepcopy(teacher_model),
                       student_seed=5, KD_TEACHER_LAYER=2, KD_STUDENT_LAYER=2)
    d.engine.eval()
    batch = make_batch(6, T=4, obj_nums=[3, 2])
    loss, logs = run(d, batch)
    assert logs['kd_disagree'].item() == 0.0
    assert logs['kd_inter'].item() < 1e-5 and logs['kd_intra'].item() < 1e-5
    assert logs['kd_att'].item() < 1e-5

    # Distilling another layer of the same network is no longer free.
    d = make_distiller('deaots', 'deaots', teacher_model=copy.deepcopy(teacher_model),
                       student_seed=5, KD_TEACHER_LAYER=2, KD_STUDENT_LAYER=1)
    d.engine.eval()
    _, logs = run(d, batch)
    assert logs['kd_att'].item() > 1e-2 and logs['kd_inter'].item() < 1e-5


@pytest.mark.parametrize('source', ['teacher', 'student'])
def test_memory_labels_come_from_the_chosen_network(source, monkeypatch):
    d = make_distiller(KD_MEMORY_LABELS=source)
    d.train()
    written, teacher_written = [], []
    student_update = d.engine.engine.update_short_term_memory
    teacher_update = d.teacher.engine.update_short_term_memory
    monkeypatch.setattr(d.engine.engine, 'update_short_term_memory',
                        lambda mask, *a, **k: (written.append(mask), student_update(mask, *a, **k)))
    monkeypatch.setattr(d.teacher.engine, 'update_short_term_memory',
                        lambda mask, *a, **k: (teacher_written.append(mask),
                                               teacher_update(mask, *a, **k)))
    _, _, records = run(d, make_batch(8, T=4), return_frames=True)
    assert len(written) == len(teacher_written) == 2  # after frames 1 and 2, not after 3
    for f, mask in enumerate(written):
        rec = records[f]
        assert torch.equal(teacher_written[f], rec['teacher_label'])  # teacher: its own
        if source == 'teacher':
            expected = rec['teacher_label']
        else:
            expected = F.interpolate(rec['student_logits'], size=(H, H), mode='bilinear',
                                     align_corners=True).argmax(1)
        assert torch.equal(mask, expected)
        assert torch.equal(rec['memory_label'], expected)
    # The pseudo-label is the argmax of the teacher's logits at the input size.
    up = F.interpolate(records[0]['teacher_logits'], size=(H, H), mode='bilinear',
                       align_corners=True)
    assert torch.equal(records[0]['teacher_label'], up.argmax(1))


# ------------------------------------------------------------------------------------------
# ablation switches


def test_lambda_zero_or_no_attention_loss_captures_nothing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('attention captured although the attention term is off')

    batch = make_batch(2)
    for fields in ({'KD_LAMBDA': 0.0}, {'KD_ATT_LOSS': 'none'}):
        d = make_distiller(**fields)
        assert not d.teacher.capture
        monkeypatch.setattr(d.teacher.model, 'capture_attention', forbidden)
        monkeypatch.setattr(d.model, 'capture_attention', forbidden)
        d.train()
        loss, logs = run(d, batch)
        assert logs['kd_att'].item() == 0.0
        assert abs(loss.item() - (logs['kd_inter'] + logs['kd_intra']).item()) < 1e-6
        for model in (d.teacher.model, d.model):
            assert all(layer.long_term_attn.capture is None for layer in model.LSTT.layers)


def ref_attention_from_inputs(module, q, k, v, u, size_2d):
    """Float64 ``{'attn', 'id_out'}`` of a long-term attention from its inputs: vanilla as in
    :func:`ref_long_term_attention`; GDA over the keys and values it samples (the sampling
    itself is checked against its equations in tests/test_deformable.py)."""
    if not hasattr(module, 'sample_memory'):
        return ref_long_term_attention(module, q, k, v, u)
    with torch.no_grad():
        k_s, v_s = module.sample_memory(k, v, module.sampling_positions(q, size_2d), size_2d)
    B, n = k_s.shape[0], k_s.shape[-1]
    return ref_long_term_attention(module, q, k_s.permute(2, 0, 1).reshape(n, B, -1),
                                   v_s.permute(2, 0, 1).reshape(n, B, -1), u)


def ref_long_term_attention(module, q, k, v, u):
    """Float64 ``{'attn', 'id_out'}`` of a vanilla long-term ``GatedPropagation`` from its
    inputs, by the equations (softmax(q k^T / sqrt(d)) v, gated by u; the ID half)."""
    L, B = q.shape[:2]
    H, d, c = module.num_head, module.d_att, module.hidden_dim
    q = q.double().view(L, B, H, d).permute(1, 2, 0, 3)
    k = k.double().view(-1, B, H, d).permute(1, 2, 0, 3)
    v = v.double().view(-1, B, H, c).permute(1, 2, 0, 3)
    attn = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    out = (attn @ v).permute(2, 0, 1, 3).reshape(L, B, H * c) * u.double()
    return {'attn': attn, 'id_out': out[..., H * c // 2:].transpose(0, 1)}


def test_teacher_layer_selection_is_one_based():
    model = recipe_model('deaotb', 5)  # three GPM layers
    batch = make_batch(9, T=3, obj_nums=[2, 1])
    frames, ref, obj_nums = clip_from_batch(batch)

    # Reference, independent of the capture hook under test: drive the model by hand,
    # recording every layer's long-term attention inputs, and recompute the attention map
    # and the gated ID output from them in float64.
    engine = build_engine('deaotengine', 'train', aot_model=model,
                          long_term_mem_gap=model.cfg.TRAIN_LONG_TERM_MEM_GAP)
    calls = [[] for _ in model.LSTT.layers]
    hooks = [record_long_term_inputs(layer.long_term_attn, calls[i])
             for i, layer in enumerate(model.LSTT.layers)]
    expected = []
    try:
        with torch.no_grad():
            engine.restart_engine(2, enable_id_shuffle=False)
            embs = split_clip_embeddings(model.encode_image(frames), 2)
            engine.add_reference_frame(mask=ref, frame_step=0, obj_nums=obj_nums,
                                       img_embs=embs[0])
            for f in (1, 2):
                engine.match_propogate_one_frame(img_embs=embs[f])
                expected.append([ref_long_term_attention(layer.long_term_attn, *calls[i][-1][:4])
                                 for i, layer in enumerate(model.LSTT.layers)])
                engine.decode_current_logits()
                engine.update_short_term_memory(engine.predict_current_mask())
    finally:
        for undo in hooks:
            undo()

    for k in (1, 2, 3):
        for tensor in ('id_out', 'attn'):
            out = Teacher(model, layer=k, tensor=tensor)(frames, ref, obj_nums)
            for f, frame in enumerate(out):
                want = expected[f][k - 1][tensor].float()
                assert frame.attention.shape == want.shape
                torch.testing.assert_close(frame.attention, want, rtol=1e-4, atol=1e-5,
                                           msg=f'layer {k} {tensor} {f}')
    for a, b in ((0, 1), (1, 2), (0, 2)):
        gap = (expected[0][a]['id_out'] - expected[0][b]['id_out']).abs().max()
        assert gap > 1e-2, (a, b, gap)
    for bad in (0, 4, '3', 2.0):
        with pytest.raises(ValueError, match=r'1\.\.3'):
            Teacher(model, layer=bad)


def test_kl_needs_the_same_keys_in_both_networks():
    with pytest.raises(ValueError, match='deformable'):
        kd_settings(kd_cfg('deaott_gda', KD_ATT_LOSS='kl', KD_ATT_TENSOR='attn'))
    with pytest.raises(ValueError, match="KD_ATT_TENSOR='attn'"):
        kd_settings(kd_cfg('deaott', KD_ATT_LOSS='kl', KD_ATT_TENSOR='id_out'))
    kd_settings(kd_cfg('deaott_gda', KD_ATT_LOSS='kl', KD_ATT_TENSOR='attn', KD_LAMBDA=0))
    # Same vanilla attention but different memory lengths (a gap-2 teacher, as R50-DeAOT-L).
    with pytest.raises(ValueError, match='KD_TEACHER_MEM_GAP'):
        make_distiller('deaott', 'deaott', KD_ATT_LOSS='kl', KD_ATT_TENSOR='attn',
                       KD_TEACHER_MEM_GAP=2)
    make_distiller('deaott', 'deaott', KD_ATT_LOSS='kl', KD_ATT_TENSOR='attn',
                   KD_TEACHER_MEM_GAP=9999)


@pytest.mark.parametrize('field,value,match', [
    ('KD_LAMBDA', -1.0, 'KD_LAMBDA'), ('KD_LAMBDA', 'x', 'KD_LAMBDA'),
    ('KD_ATT_LOSS', 'mse', 'KD_ATT_LOSS'), ('KD_ATT_TENSOR', 'qk', 'KD_ATT_TENSOR'),
    ('KD_MEMORY_LABELS', 'gt', 'KD_MEMORY_LABELS'), ('KD_TEACHER_LAYER', 0, 'KD_TEACHER_LAYER'),
    ('KD_STUDENT_LAYER', 1.5, 'KD_STUDENT_LAYER'), ('KD_TEACHER_MEM_GAP', 0, 'MEM_GAP'),
])
def test_bad_kd_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        kd_settings(kd_cfg(**{field: value}))


def test_student_layer_out_of_range_is_named():
    with pytest.raises(ValueError, match=r'KD_STUDENT_LAYER.*1\.\.1'):
        make_distiller(KD_STUDENT_LAYER=2)


def test_configs_and_flags():
    from configs.kd_stage1 import EngineConfig as Stage1
    cfg1 = Stage1('kd_stage1')  # the stage's own default student
    assert cfg1.MODEL_ID == 'deaott_gda' and cfg1.MODEL_LT_ATTENTION == 'deformable'
    assert cfg1.STAGE_NAME == 'KD_STAGE1' and cfg1.DATASETS == ['static'] and cfg1.TRAIN_KD
    for key, value in KD_DEFAULTS.items():  # the config lists every field, with the defaults
        assert getattr(cfg1, key) == value, key
    cfg2 = build_config('kd_stage2', 'kd_stage2', 'deaott')
    assert cfg2.STAGE_NAME == 'KD_STAGE2' and cfg2.DATASETS == ['youtubevos', 'davis2017']
    assert cfg2.MODEL_LT_ATTENTION == 'vanilla' and cfg2.TRAIN_KD
    assert cfg2.PRETRAIN_FULL and cfg2.PRETRAIN_MODEL.replace(os.sep, '/').endswith(
        'result/kd_stage1_DeAOTT/KD_STAGE1/ema_ckpt/save_step_100000.pth')

    parser = add_kd_arguments(argparse.ArgumentParser())
    assert parser.parse_args(['--student', 'deaott']).student == 'deaott'
    args = parser.parse_args(['--teacher', 'deaotb', '--teacher_ckpt', 'random',
                              '--kd_teacher_layer', '2', '--kd_lambda', '0',
                              '--kd_att_loss', 'none', '--kd_att_tensor', 'attn',
                              '--kd_memory_labels', 'student', '--kd_teacher_mem_gap', '3'])
    cfg = apply_kd_arguments(build_config('kd_stage1', 'x'), args)
    assert (cfg.KD_TEACHER, cfg.KD_TEACHER_CKPT, cfg.KD_TEACHER_LAYER, cfg.KD_LAMBDA,
            cfg.KD_ATT_LOSS, cfg.KD_ATT_TENSOR, cfg.KD_MEMORY_LABELS, cfg.KD_TEACHER_MEM_GAP) == \
        ('deaotb', 'random', 2, 0.0, 'none', 'attn', 'student', 3)
    untouched = apply_kd_arguments(build_config('kd_stage1', 'x'), parser.parse_args([]))
    assert untouched.KD_LAMBDA == 1.5 and untouched.KD_TEACHER == 'r50_deaotl'
    with pytest.raises(SystemExit):
        parser.parse_args(['--kd_att_loss', 'mse'])
    with pytest.raises(ValueError, match='deformable'):
        apply_kd_arguments(Stage1('x'),  # a GDA student
                           parser.parse_args(['--kd_att_loss', 'kl', '--kd_att_tensor', 'attn']))


def test_resample_tokens_keeps_rows_on_the_same_pixels():
    x = torch.randn(2, 25, 7)
    assert resample_tokens(x, (5, 5), (5, 5), 1) is x
    # A field linear in (row, col) is reproduced exactly by bilinear (align_corners) resampling.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 5), torch.linspace(0, 1, 5), indexing='ij')
    ramp = (2 * yy + 3 * xx).reshape(1, 1, 25, 1).expand(2, 1, 25, 4)   # (B, heads, L, N)
    out = resample_tokens(ramp, (5, 5), (9, 9), 2)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 1, 9), indexing='ij')
    assert out.shape == (2, 1, 81, 4)
    torch.testing.assert_close(out[0, 0, :, 0], (2 * yy + 3 * xx).reshape(81))


# ------------------------------------------------------------------------------------------
# teacher construction and checkpoints


def test_teacher_checkpoint_errors_and_loading(tmp_path):
    missing = tmp_path / 'nowhere' / 'R50_DeAOTL_PRE_YTB_DAV.pth'
    with pytest.raises(FileNotFoundError, match='--teacher_ckpt') as err:
        build_teacher('deaott', str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match='--teacher_ckpt'):
        build_teacher('deaott', '')
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    with pytest.raises(RuntimeError, match=str(corrupt)):
        build_teacher('deaott', str(corrupt))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_distiller(kd_cfg(KD_TEACHER='deaott', KD_TEACHER_LAYER=1,
                               KD_TEACHER_CKPT=str(missing)),
                        recipe_model('deaott_gda', 7))

    # A saved model loads strictly and comes out frozen.
    source = recipe_model('deaots', 5)
    path = save_network(source, 1, str(tmp_path / 'ckpt'))
    teacher = build_teacher('deaots', path, layer=2)
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in source.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value), key
    with pytest.raises(Exception, match='does not fit'):
        build_teacher('deaotb', path)  # a checkpoint of another architecture

    # 'random' is for tests: seeded, identical every time, and the caller's RNG is untouched.
    state = torch.get_rng_state()
    a = build_teacher('deaott', RANDOM_TEACHER, layer=1)
    b = build_teacher('deaott', RANDOM_TEACHER, layer=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------
# integration


@pytest.mark.slow  # ~25 s of CPU
def test_distillation_lowers_student_teacher_disagreement_over_fifty_steps():
    d = make_distiller('deaott_gda', 'deaott', KD_TEACHER_LAYER=1)
    held_out = [make_batch(1000 + i) for i in range(3)]

    def evaluate():
        d.engine.eval()
        with torch.no_grad():
            logs = [run(d, b)[1] for b in held_out]
        d.train()
        dist = np.mean([(lg['kd_inter'] + lg['kd_intra']).item() for lg in logs])
        return dist, np.mean([lg['kd_disagree'].item() for lg in logs])

    dist0, disagree0 = evaluate()
    opt = torch.optim.AdamW([p for _, p in d.named_trainable_parameters()], lr=1e-3)
    d.train()
    for step in range(50):
        torch.manual_seed(step)
        loss, _ = d(make_batch(step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist1, disagree1 = evaluate()
    print(f'held-out DIST {dist0:.3f} -> {dist1:.3f}, disagreement {disagree0:.3f} -> '
          f'{disagree1:.3f}')
    assert dist1 < 0.6 * dist0, (dist0, dist1)
    assert disagree1 < 0.75 * disagree0, (disagree0, disagree1)


def write_static_pairs(folder, n=4, seed=0):
    """Image + mask pairs (``<stem>.jpg`` + ``<stem>.png``), two boxes each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (rng.uniform(0, 255, (80, 96, 3)) * 0.3 + 60).astype(np.uint8)
        mask = np.zeros((80, 96), np.uint8)
        for k in (1, 2):
            y, x = rng.integers(5, 50), rng.integers(5, 60)
            mask[y:y + 22, x:x + 28] = k
            img[mask == k] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(folder / f'img{i}.jpg')
        Image.fromarray(mask).save(folder / f'img{i}.png')


def write_custom_video(root, frames=3):
    (root / 'JPEGImages' / 'seq').mkdir(parents=True)
    (root / 'Annotations' / 'seq').mkdir(parents=True)
    rng = np.random.default_rng(1)
    for t in range(frames):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
            root / 'JPEGImages' / 'seq' / f'{t:05d}.jpg')
    mask = np.zeros((64, 80), np.uint8)
    mask[10:30, 10:40] = 1
    mask[35:60, 40:70] = 2
    im = Image.fromarray(mask, 'P')
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.save(root / 'Annotations' / 'seq' / '00000.png')


def kd_train_argv(data, steps=2):
    """``tools/train.py`` flags for a tiny CPU kd_stage1 run with a random deaott teacher."""
    return ['--exp_name', 'kd_stage1', '--model', 'deaott_gda', '--device', 'cpu',
            '--data_path', str(data), '--batch_size', '2', '--total_step', str(steps),
            '--save_step', str(steps), '--log_step', '1', '--workers', '0', '--no_pretrain',
            '--no_progress', '--set', 'DATA_RANDOMCROP=(65,65)', 'DATA_SEQ_LEN=3',
            'KD_TEACHER=deaott', f'KD_TEACHER_CKPT={RANDOM_TEACHER}', 'KD_TEACHER_LAYER=1']


def test_train_kd_stage1_end_to_end_writes_a_student_eval_loads(tmp_path, monkeypatch):
    from tools.eval import main as eval_main
    from tools.train import main as train_main
    write_static_pairs(tmp_path / 'datasets' / 'Static')
    monkeypatch.setenv('AOT_RESULT_ROOT', str(tmp_path))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tools/train.py keeps our 1 thread
    train_main(kd_train_argv(tmp_path / 'datasets'))
    result = tmp_path / 'result' / 'kd_stage1_DeAOTT_GDA' / 'KD_STAGE1'
    ckpt = result / 'ckpt' / 'save_step_2.pth'
    assert ckpt.is_file() and (result / 'ema_ckpt' / 'save_step_2.pth').is_file()
    log = (result / 'log' / 'train.log').read_text()
    assert 'I:2' in log and 'Loss:' in log

    # The checkpoint is the student alone, and it loads strictly.
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    _, student, _ = load_vos_model('deaott_gda', str(ckpt), strict=True)
    assert set(state) == set(student.state_dict())
    assert not any(k.startswith(('teacher', 'engine')) for k in state)

    write_custom_video(tmp_path / 'custom')
    code = eval_main(['--exp_name', 'kd_stage1', '--stage', 'kd_stage1', '--model', 'deaott_gda',
                      '--ckpt_path', str(ckpt), '--dataset', 'custom',
                      '--data_path', str(tmp_path / 'custom'),
                      '--result_path', str(tmp_path / 'results'), '--device', 'cpu',
                      '--workers', '0'])
    assert code == 0
    masks = sorted((tmp_path / 'results' / 'custom').glob('*/Annotations/seq/*.png'))
    assert [m.name for m in masks] == ['00000.png', '00001.png', '00002.png']


@pytest.mark.slow  # two spawned processes, ~15 s
def test_train_kd_stage1_on_two_cpu_processes(tmp_path, monkeypatch):
    """DDP (gloo): only the student engine is wrapped; the teacher stays a plain module."""
    from tools.train import main as train_main
    write_static_pairs(tmp_path / 'datasets' / 'Static')
    monkeypatch.setenv('AOT_RESULT_ROOT', str(tmp_path))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    train_main(kd_train_argv(tmp_path / 'datasets', steps=3) + ['--gpu_num', '2'])
    result = tmp_path / 'result' / 'kd_stage1_DeAOTT_GDA' / 'KD_STAGE1'
    ckpt = torch.load(result / 'ckpt' / 'save_step_3.pth', map_location='cpu', weights_only=True)
    assert ckpt['trainer']['world_size'] == 2
    _, student, _ = load_vos_model('deaott_gda', str(result / 'ckpt' / 'save_step_3.pth'))
    assert all(torch.isfinite(p).all() for p in student.parameters())


def _two_object_clips():
    """Two clips with two objects each. The KD terms are means over valid (sample, channel)
    pairs, so with unequal object counts the weighting of a sample depends on how the batch
    is split over processes; with equal counts it does not."""
    from tests.test_trainer import TinyClips
    clips = TinyClips(n=4)
    clips.items = [clips.items[1], clips.items[3]]
    assert [c['meta']['obj_num'] for c in clips.items] == [2, 2]
    return clips


def _kd_ddp_worker(rank, root, init_file):
    from tests.test_trainer import make_trainer, tiny_cfg, without_dropout
    torch.set_num_threads(1)
    cfg = tiny_cfg(root, batch=2, world=2, DIST_URL='file://' + init_file, **KD_TRAINER_FIELDS)
    trainer = without_dropout(make_trainer(cfg, _two_object_clips(), rank=rank))
    try:
        trainer.sequential_training(stop_step=2)
    finally:
        trainer.close()


# A vanilla deaott student distilled from a random deaott teacher (its first GPM layer).
# SGD, not AdamW: the comparison is of the reduced gradients, and AdamW's g / sqrt(v) turns the
# float rounding of a near-zero gradient element into an update of full size (on an AVX2-only
# CPU two AdamW steps differed by 1.3e-5 against 1e-3 updates); an SGD update is linear in the
# gradient, so rounding stays rounding while a missing reduction still moves it by ~100%.
KD_TRAINER_FIELDS = dict(TRAIN_KD=True, KD_TEACHER='deaott', KD_TEACHER_CKPT=RANDOM_TEACHER,
                         KD_TEACHER_LAYER=1, TRAIN_LSTT_DROPPATH=0.0, TRAIN_OPT='sgd')


@pytest.mark.slow  # two spawned processes and a single-process run, ~40 s
def test_kd_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    """Distillation on 2 gloo processes with 1 sample each updates the student exactly as
    1 process on both samples (ID shuffles drawn per global batch, dropout off), and the
    teacher is neither wrapped nor saved."""
    import torch.multiprocessing as mp

    from tests.test_trainer import make_trainer, saved, tiny_cfg, without_dropout
    ddp_root = tmp_path / 'ddp'
    mp.spawn(_kd_ddp_worker, args=(str(ddp_root), str(tmp_path / 'rendezvous')), nprocs=2,
             join=True)
    single_cfg = tiny_cfg(tmp_path / 'single', batch=2, **KD_TRAINER_FIELDS)
    trainer = without_dropout(make_trainer(single_cfg, _two_object_clips()))
    assert isinstance(trainer.step_fn, Distiller)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.sequential_training(stop_step=2)

    ddp_ckpt = saved(tiny_cfg(ddp_root, batch=2, world=2, **KD_TRAINER_FIELDS), 2)
    one_ckpt = saved(single_cfg, 2)
    assert ddp_ckpt['trainer']['world_size'] == 2 and one_ckpt['trainer']['world_size'] == 1
    ddp, one = ddp_ckpt['state_dict'], one_ckpt['state_dict']
    assert sorted(ddp) == sorted(one) == sorted(initial)   # the student only, no teacher keys
    max_update = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert max_update > 1e-4   # far above the tolerance: a missing reduction would show
    for key in one:
        # The updates themselves, to a few float32 ulps of the weights (~7e-9 here).
        torch.testing.assert_close(ddp[key] - initial[key], one[key] - initial[key],
                                   rtol=1e-3, atol=5e-8, msg=key)
