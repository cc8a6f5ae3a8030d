"""Distillation losses: DIST relation losses over object channels and attention losses.

``L = w_inter * L_inter + w_intra * L_intra + lambda * L_att`` (defaults 1, 1, 1.5), where

* ``L_inter`` / ``L_intra`` are DIST's Pearson distances (Huang et al., NeurIPS 2022) between the
  student's and the teacher's softmax maps, restricted to the object channels in use;
* ``L_att`` is ``1 - CKA`` (linear CKA, Kornblith et al., ICML 2019) between the two networks'
  attention tensors, or a KL divergence between softmax attention maps for the ablation.

Everything is computed in float32 with autocast disabled, whatever the input dtype: fp16 softmax
of DeAOT's -1e4 padded logits and fp16 Gram products both go wrong in ways that are hard to spot.

Conventions:

* Logits are ``(B, C, H, W)``; ``valid`` ``(B, C)`` bool marks the channels in use (background 0
  and the objects present). Padded channels are excluded everywhere, softmax included, so their
  content (DeAOT's -1e10 fill or anything else) changes nothing and gets no gradient.
* Pearson distance ``d(u, v) = 1 - <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + 1e-8)``.
* A sample with only two valid channels (one object) has a degenerate inter term: the centred
  probability vector is ``(p - 1/2) (1, -1)``, so the per-pixel correlation is the sign of
  ``(p_s - 1/2)(p_t - 1/2)``, 0 or 2 with no useful gradient. Such samples are left out of
  ``L_inter`` (``inter_min_channels=3``) and the mean is taken over the remaining pixels;
  ``L_inter`` is 0 when no sample qualifies. ``L_intra`` keeps them: per-channel maps over pixels
  stay informative (background and object give the same distance there, and both count, as every
  (sample, valid channel) pair does). A sample with the background channel only has nothing to relate and is left
  out of both terms.
* Attention tensors are batch-first: ``(B, n, p)`` with rows = the ``n`` query tokens of one
  (sample, frame), or softmax maps ``(B, heads, n, keys)``. Sequence-first GPM tensors
  ``(HW, B, C)`` must be permuted by the caller (``x.permute(1, 0, 2)``). Fold frames into ``B``.
"""
import contextlib

import torch
import torch.nn as nn

__all__ = [
    'linear_cka', 'inter_relation_loss', 'intra_relation_loss', 'attention_cka_loss',
    'attention_kl_loss', 'valid_channels', 'DistillationLoss',
]

PEARSON_EPS = 1e-8
# A centred matrix whose norm is below this fraction of the raw norm is constant up to float32
# rounding; its CKA is undefined (normalising would blow rounding noise up to unit size).
_CONSTANT_RTOL = 1e-5
_KL_FLOOR = 1e-12  # student probabilities below this are clamped so log() stays finite


def _no_autocast(device_type):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know has nothing to disable
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# CKA


def _centre_and_normalise(x):
    """Column-centres ``(*, n, p)`` and scales each matrix to unit Frobenius norm.

    Returns the normalised matrix (zeros where the input is constant) and the ``(*,)`` mask of
    non-constant matrices. The scaling is allowed by CKA's scale invariance and keeps the
    squared-norm terms far from float32 overflow.
    """
    xc = x - x.mean(dim=-2, keepdim=True)
    sq = xc.square().sum(dim=(-2, -1))
    raw = x.square().sum(dim=(-2, -1))
    ok = sq > (_CONSTANT_RTOL ** 2) * raw
    # Double where: the constant case never sees rsqrt of ~0, so its gradient stays finite.
    scale = torch.rsqrt(torch.where(ok, sq, torch.ones_like(sq)))
    xn = torch.where(ok[..., None, None], xc * scale[..., None, None], torch.zeros_like(xc))
    return xn, ok


def _pick_form(n, p, q):
    # Feature space costs n (pq + p^2 + q^2) multiply-adds, Gram space n^2 (p + q + 1).
    return 'feature' if p * q + p * p + q * q <= n * (p + q + 1) else 'gram'


def _linear_cka(x, y, form='auto'):
    """``(cka, defined)``, both ``(*,)``, for ``x`` ``(*, n, p)`` and ``y`` ``(*, n, q)``."""
    if x.dim() < 2 or y.dim() < 2:
        raise ValueError(f'linear_cka: inputs must be (n, p) matrices (optionally batched), '
                         f'got shapes {tuple(x.shape)} and {tuple(y.shape)}')
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f'linear_cka: the two inputs must have the same rows (the same n '
                         f'examples, same batch dims), got shapes {tuple(x.shape)} and '
                         f'{tuple(y.shape)}')
    if form not in ('auto', 'feature', 'gram'):
        raise ValueError(f"linear_cka: form must be 'auto', 'feature' or 'gram', got {form!r}")
    n, p, q = x.shape[-2], x.shape[-1], y.shape[-1]
    if form == 'auto':
        form = _pick_form(n, p, q)
    with _no_autocast(x.device.type):
        xn, x_ok = _centre_and_normalise(x.float())
        yn, y_ok = _centre_and_normalise(y.float())
        if form == 'feature':
            # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
            num = (yn.mT @ xn).square().sum(dim=(-2, -1))
            den = (torch.linalg.matrix_norm(xn.mT @ xn) * torch.linalg.matrix_norm(yn.mT @ yn))
        else:
            # <K, L>_F / (||K||_F ||L||_F) with the centred linear kernels K = XX^T, L = YY^T
            k, l = xn @ xn.mT, yn @ yn.mT
            num = (k * l).sum(dim=(-2, -1))
            den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
        defined = x_ok & y_ok
        cka = num / torch.where(defined, den, torch.ones_like(den))
        # Rounding can leave [0, 1] by an ulp; the clamp keeps the documented range.
        cka = torch.where(defined, cka, torch.zeros_like(cka)).clamp(0.0, 1.0)
    return cka, defined


def linear_cka(x, y, form='auto'):
    """Linear CKA between two representations of the same ``n`` examples.

    ``x``: ``(n, p)``, ``y``: ``(n, q)`` (or both with the same leading batch dims ``(*, n, .)``);
    ``p`` and ``q`` may differ, and either may exceed ``n``. Returns a float32 value in [0, 1]
    (shape ``()`` or ``(*,)``): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` with column-centred
    ``X`` and ``Y`` (biased HSIC; the ``(n - 1)^2`` factors cancel). 0 where either side is
    constant across rows, for which CKA is undefined.

    ``form``: ``'feature'`` (p x q products), ``'gram'`` (n x n kernels) or ``'auto'``, which takes
    the cheaper one. Both give the same value.
    """
    return _linear_cka(x, y, form)[0]


def _attention_rows(attn, who):
    """``(B, n, p)`` as is; ``(B, heads, n, keys)`` -> ``(B, n, heads * keys)``."""
    if attn.dim() == 3:
        return attn
    if attn.dim() == 4:
        B, h, n, k = attn.shape
        return attn.permute(0, 2, 1, 3).reshape(B, n, h * k)
    raise ValueError(f'{who}: attention tensors must be (B, n, p) or (B, heads, n, keys), '
                     f'got shape {tuple(attn.shape)}')


def attention_cka_loss(student_attn, teacher_attn, form='auto'):
    """Mean over samples of ``1 - CKA(student[b], teacher[b])``.

    Rows are the ``n`` query tokens of one sample (and frame); the feature widths may differ.
    ``(B, heads, n, keys)`` maps have their heads concatenated along the feature axis. Samples
    where either side is constant are left out of the mean (0 when none is left).
    """
    s = _attention_rows(student_attn, 'attention_cka_loss')
    t = _attention_rows(teacher_attn, 'attention_cka_loss')
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f'attention_cka_loss: student {tuple(student_attn.shape)} and teacher '
                         f'{tuple(teacher_attn.shape)} must share the batch size and the query '
                         f'tokens n (resample the student to the teacher grid first)')
    cka, defined = _linear_cka(s, t, form)
    w = defined.float()
    return ((1.0 - cka) * w).sum() / w.sum().clamp_min(1.0)


def attention_kl_loss(student_attn, teacher_attn):
    """KL(teacher || student) between softmax attention maps, averaged over query rows.

    Both ``(..., n, keys)`` with rows summing to 1 and **equal shapes**: a KL divergence compares
    distributions over the same keys, so a student whose key set differs from the teacher's
    (GDA's sampled keys, another memory length) cannot use this loss; it raises ``ValueError``
    rather than guessing an alignment. Use the CKA loss there, which needs no key alignment.
    """
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f'attention_kl_loss: student {tuple(student_attn.shape)} and teacher '
                         f'{tuple(teacher_attn.shape)} maps differ in shape; KL needs the same '
                         f'query rows and the same keys (use attention_loss="cka" otherwise)')
    with _no_autocast(student_attn.device.type):
        s = student_attn.float()
        t = teacher_attn.float()
        kl = torch.xlogy(t, t) - torch.xlogy(t, s.clamp_min(_KL_FLOOR))
        return kl.sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# DIST relation losses


def valid_channels(obj_nums, num_channels, device=None):
    """``(B, C)`` bool mask with channels ``0 .. obj_nums[b]`` set (background and objects)."""
    top = torch.as_tensor(obj_nums, device=device).reshape(-1, 1)
    return torch.arange(num_channels, device=top.device)[None, :] <= top


def _relation_probs(student_logits, teacher_logits, valid, who):
    """Float32 softmax over the valid channels: ``(B, C, HW)`` each, padded channels exactly 0."""
    if (student_logits.dim() != 4 or teacher_logits.dim() != 4
            or student_logits.shape[:2] != teacher_logits.shape[:2]):
        raise ValueError(f'{who}: logits must both be (B, C, H, W) with the same B and C, got '
                         f'{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}')
    if student_logits.shape[2:] != teacher_logits.shape[2:]:
        raise ValueError(f'{who}: student logits {tuple(student_logits.shape)} and teacher logits '
                         f'{tuple(teacher_logits.shape)} differ in size; resize the student to '
                         f'the teacher (bilinear) before the loss')
    B, C = student_logits.shape[:2]
    if tuple(valid.shape) != (B, C):
        raise ValueError(f'{who}: valid must be ({B}, {C}) to match the logits, '
                         f'got {tuple(valid.shape)}')
    valid = valid.to(device=student_logits.device, dtype=torch.bool)
    # Finite fill: a sample with no valid channel gets a uniform softmax instead of NaN.
    fill = torch.finfo(torch.float32).min

    def probs(z):
        z = z.float().flatten(2).masked_fill(~valid[:, :, None], fill)
        return torch.softmax(z, dim=1) * valid[:, :, None]

    return probs(student_logits), probs(teacher_logits), valid


def _pearson_distance(u, v, dim):
    """``1 - cos(u - mean u, v - mean v)`` along ``dim`` (means over the entries given)."""
    u = u - u.mean(dim=dim, keepdim=True)
    v = v - v.mean(dim=dim, keepdim=True)
    dot = (u * v).sum(dim=dim)
    # vector_norm's backward is 0 (not NaN) at a zero vector, e.g. an exactly uniform softmax.
    den = torch.linalg.vector_norm(u, dim=dim) * torch.linalg.vector_norm(v, dim=dim)
    return 1.0 - dot / (den + PEARSON_EPS)


def inter_relation_loss(student_logits, teacher_logits, valid, min_channels=3):
    """DIST inter-class term: per pixel, Pearson distance across the valid channels; mean over
    the pixels of the samples with at least ``min_channels`` valid channels (0 if none).

    ``student_logits``, ``teacher_logits``: ``(B, C, H, W)``; ``valid``: ``(B, C)`` bool.
    Returns a float32 scalar. ``min_channels=3`` drops single-object samples (see module notes);
    pass 2 to keep them.
    """
    with _no_autocast(student_logits.device.type):
        ps, pt, valid = _relation_probs(student_logits, teacher_logits, valid,
                                        'inter_relation_loss')
        vf = valid.float()[:, :, None]  # (B, C, 1)
        count = vf.sum(1, keepdim=True).clamp_min(1.0)
        # Centre over the valid channels only; padded entries are zeroed so they add nothing.
        us = (ps - ps.sum(1, keepdim=True) / count) * vf
        ut = (pt - pt.sum(1, keepdim=True) / count) * vf
        dot = (us * ut).sum(1)
        den = torch.linalg.vector_norm(us, dim=1) * torch.linalg.vector_norm(ut, dim=1)
        per_pixel = 1.0 - dot / (den + PEARSON_EPS)  # (B, HW)
        keep = (valid.sum(1) >= max(int(min_channels), 2)).float()  # (B,)
        # Every sample has the same HW, so the pixel mean is the mean of per-sample means.
        return (per_pixel.mean(1) * keep).sum() / keep.sum().clamp_min(1.0)


def intra_relation_loss(student_logits, teacher_logits, valid):
    """DIST intra-class term: per (sample, valid channel), Pearson distance of the two
    probability maps across that sample's pixels; mean over those pairs (0 if none).

    ``student_logits``, ``teacher_logits``: ``(B, C, H, W)``; ``valid``: ``(B, C)`` bool.
    Samples with the background channel only are left out. Returns a float32 scalar.
    """
    with _no_autocast(student_logits.device.type):
        ps, pt, valid = _relation_probs(student_logits, teacher_logits, valid,
                                        'intra_relation_loss')
        per_channel = _pearson_distance(ps, pt, dim=2)  # (B, C)
        pairs = (valid & (valid.sum(1, keepdim=True) >= 2)).float()
        return (per_channel * pairs).sum() / pairs.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Combined


class DistillationLoss(nn.Module):
    """``w_inter * L_inter + w_intra * L_intra + lambda_att * L_att`` on one batch of frames.

    Args:
        lambda_att: weight of the attention term (1.5 in the paper; 0 gives DIST alone).
        attention_loss: ``'cka'`` (1 - linear CKA), ``'kl'`` (ablation; needs equal map shapes)
            or ``'none'``.
        inter_weight, intra_weight: DIST's beta and gamma (1 and 1; intra 0 for the
            "inter + attention" ablation).
        inter_min_channels: samples with fewer valid channels are left out of the inter term.
        cka_form: ``'auto'``, ``'feature'`` or ``'gram'`` (see :func:`linear_cka`).

    The teacher's tensors are detached. ``forward`` returns ``(total, parts)`` where ``parts``
    holds the unweighted ``'inter'``, ``'intra'`` and ``'att'`` scalars (``'att'`` is 0 when the
    attention term is off).
    """

    def __init__(self, lambda_att=1.5, attention_loss='cka', inter_weight=1.0, intra_weight=1.0,
                 inter_min_channels=3, cka_form='auto'):
        super().__init__()
        if attention_loss not in ('cka', 'kl', 'none'):
            raise ValueError(f"attention_loss must be 'cka', 'kl' or 'none', got "
                             f'{attention_loss!r}')
        self.lambda_att = float(lambda_att)
        self.attention_loss = attention_loss
        self.inter_weight = float(inter_weight)
        self.intra_weight = float(intra_weight)
        self.inter_min_channels = int(inter_min_channels)
        self.cka_form = cka_form

    @property
    def uses_attention(self):
        return self.attention_loss != 'none' and self.lambda_att != 0.0

    def forward(self, student_logits, teacher_logits, valid, student_attn=None,
                teacher_attn=None):
        """Logits ``(B, C, H, W)``; ``valid`` ``(B, C)`` bool; attention ``(B, n, p)`` or
        ``(B, heads, n, keys)`` (needed only when the attention term is on)."""
        teacher_logits = teacher_logits.detach()
        inter = inter_relation_loss(student_logits, teacher_logits, valid,
                                    min_channels=self.inter_min_channels)
        intra = intra_relation_loss(student_logits, teacher_logits, valid)
        total = self.inter_weight * inter + self.intra_weight * intra
        if self.uses_attention:
            if student_attn is None or teacher_attn is None:
                raise ValueError(f'DistillationLoss: attention_loss={self.attention_loss!r} with '
                                 f'lambda_att={self.lambda_att} needs student_attn and '
                                 f'teacher_attn')
            teacher_attn = teacher_attn.detach()
            if self.attention_loss == 'cka':
                att = attention_cka_loss(student_attn, teacher_attn, form=self.cka_form)
            else:
                att = attention_kl_loss(student_attn, teacher_attn)
            total = total + self.lambda_att * att
        else:
            att = inter.new_zeros(())
        return total, {'inter': inter, 'intra': intra, 'att': att}

    def extra_repr(self):
        return (f'lambda_att={self.lambda_att}, attention_loss={self.attention_loss!r}, '
                f'inter_weight={self.inter_weight}, intra_weight={self.intra_weight}, '
                f'inter_min_channels={self.inter_min_channels}')
