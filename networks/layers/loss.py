"""Training losses of AOT/DeAOT: bootstrapped (top-k) cross-entropy and soft Jaccard.

The engine weights them 0.5 / 0.5 per frame. Both return one value per batch element, shape
``(B,)``, and both follow upstream's numbers exactly (a golden training fixture pins them),
including upstream's quirks:

* top-k CE counts ignored pixels in ``H * W`` (with loss 0), and its "fixed top-k when the mining
  step is 0" branch can never trigger because ``1e-5`` is added to the step count;
* soft Jaccard averages over the classes present in the ground truth only.

Inputs are logits ``(B, C, H, W)`` and integer labels ``(B, 1, H, W)`` or ``(B, H, W)`` with
``255`` marking ignored pixels. Upstream calls the losses with *lists* of per-element tensors
``(1, C_b, H, W)`` (each cut to its own ``obj_num + 1`` channels); that call form is accepted too.
With a batched tensor, ``obj_nums`` does the same cut: channels above ``obj_nums[b]`` are left out
of sample ``b``'s softmax, so a padded batch gives the per-element numbers.

Everything is computed in float32, also under autocast.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CrossEntropyLoss', 'SoftJaccordLoss', 'SoftJaccardLoss']


def _no_autocast(device_type):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know has nothing to disable
        return contextlib.nullcontext()


def _prepare(logits, labels, obj_nums, ignore_index, who):
    """Checks shapes and ids; returns float32 ``(B, C, HW)`` logits with the channels above each
    sample's object count masked out, and int64 ``(B, HW)`` labels."""
    if logits.dim() != 4:
        raise ValueError(f'{who}: logits must be (B, C, H, W), got shape {tuple(logits.shape)}')
    B, C, H, W = logits.shape
    if labels.dim() == 4:
        if labels.shape[1] != 1:
            raise ValueError(f'{who}: labels must be (B, 1, H, W) or (B, H, W), '
                             f'got shape {tuple(labels.shape)}')
        labels = labels[:, 0]
    if labels.dim() != 3 or tuple(labels.shape) != (B, H, W):
        raise ValueError(f'{who}: labels of shape {tuple(labels.shape)} do not match logits of '
                         f'shape {tuple(logits.shape)}; expected (B, 1, H, W) or (B, H, W) with '
                         f'the same B, H, W (upsample the logits to the label size first)')
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f'{who}: labels must be an integer tensor, got {labels.dtype}')
    labels = labels.reshape(B, H * W).long()
    logits = logits.float().reshape(B, C, H * W)

    # The highest class id each sample may use: C - 1, or its object count.
    if obj_nums is None:
        top = torch.full((B,), C - 1, dtype=torch.long, device=labels.device)
    else:
        top = torch.as_tensor(obj_nums, dtype=torch.long, device=labels.device).reshape(-1)
        if top.numel() != B:
            raise ValueError(f'{who}: obj_nums has {top.numel()} entries for a batch of {B}')
        if bool(((top < 0) | (top > C - 1)).any()):
            raise ValueError(f'{who}: obj_nums {top.tolist()} must lie in [0, {C - 1}] '
                             f'for logits with {C} channels')
        in_use = torch.arange(C, device=logits.device)[None, :] <= top.to(logits.device)[:, None]
        logits = logits.masked_fill(~in_use[:, :, None], float('-inf'))

    # A label beyond the channels would index past the softmax; say so instead of returning inf
    # (CPU) or tripping a device-side assert (CUDA).
    bad = ((labels < 0) | (labels > top[:, None])) & (labels != ignore_index)
    if bool(bad.any()):
        ids = torch.unique(labels[bad])[:8].tolist()
        raise ValueError(f'{who}: labels hold ids {ids} outside [0, obj_num] (logits have {C} '
                         f'channels; obj_nums={None if obj_nums is None else top.tolist()}) and '
                         f'are not the ignore index {ignore_index}')
    return logits, labels


def _per_element(loss, logits, labels, **kwargs):
    """Upstream's call form: lists of ``(1, C_b, H, W)`` logits and ``(1, H, W)`` labels."""
    if not isinstance(labels, (list, tuple)) or len(labels) != len(logits):
        raise ValueError(f'{type(loss).__name__}: a list of logits needs a list of labels of the '
                         f'same length')
    return torch.cat([loss(lg, lb, **kwargs) for lg, lb in zip(logits, labels)])


class CrossEntropyLoss(nn.Module):
    """Per-pixel cross-entropy, optionally bootstrapped to the hardest pixels.

    With ``top_k_percent_pixels=None``: mean CE over the non-ignored pixels of each sample
    (0 for a sample whose pixels are all ignored, where upstream gives NaN).

    With ``top_k_percent_pixels = f`` in (0, 1): the mean of the ``k`` largest pixel losses, where
    ``ratio = min(1, step / (hard_example_mining_step + 1e-5))`` and
    ``k = int((ratio * f + (1 - ratio)) * H * W)``. The kept fraction is annealed linearly from
    100 % to ``f``. Ignored pixels count in ``H * W`` with loss 0 (upstream's behaviour).
    """

    def __init__(self, top_k_percent_pixels=None, hard_example_mining_step=100000,
                 ignore_index=255):
        super().__init__()
        if top_k_percent_pixels is not None and not 0 < top_k_percent_pixels < 1:
            raise ValueError(f'top_k_percent_pixels must lie in (0, 1) or be None, '
                             f'got {top_k_percent_pixels}')
        self.top_k_percent_pixels = top_k_percent_pixels
        # Upstream stores the step with 1e-5 added, which also keeps the division finite.
        self.hard_example_mining_step = hard_example_mining_step + 1e-5
        self.ignore_index = ignore_index

    def num_kept_pixels(self, num_pixels, step):
        """How many of ``num_pixels`` pixels the top-k mean keeps at ``step``."""
        ratio = min(1.0, step / float(self.hard_example_mining_step))
        return int((ratio * self.top_k_percent_pixels + (1.0 - ratio)) * num_pixels)

    def forward(self, logits, labels, step=None, obj_nums=None):
        """``logits`` ``(B, C, H, W)``, ``labels`` ``(B, [1,] H, W)`` int -> ``(B,)`` float32."""
        if isinstance(logits, (list, tuple)):
            return _per_element(self, logits, labels, step=step)
        if self.top_k_percent_pixels is not None and step is None:
            raise ValueError('CrossEntropyLoss: top-k bootstrapping needs the training step '
                             '(forward(logits, labels, step))')
        with _no_autocast(logits.device.type):
            z, y = _prepare(logits, labels, obj_nums, self.ignore_index, 'CrossEntropyLoss')
            pixel_losses = F.cross_entropy(z, y, ignore_index=self.ignore_index,
                                           reduction='none')  # (B, HW), 0 where ignored
            if self.top_k_percent_pixels is None:
                count = (y != self.ignore_index).sum(1).clamp_min(1)
                return pixel_losses.sum(1) / count
            # k = 0 (upstream: mean of nothing, NaN) only happens for tiny maps; keep one pixel.
            k = max(1, self.num_kept_pixels(pixel_losses.shape[1], step))
            return pixel_losses.topk(k, dim=1).values.mean(1)


class SoftJaccordLoss(nn.Module):
    """Soft Jaccard (Tversky with alpha = beta = 1) over the classes present in the ground truth.

    For each class ``c`` present in a sample's non-ignored labels, with ``p`` the softmax and
    ``g`` the one-hot labels summed over non-ignored pixels:
    ``1 - sum(p g) / (sum(p g) + sum(p (1 - g)) + sum((1 - p) g) + 1e-6)``; the sample's loss is
    the mean over its present classes (0 when every pixel is ignored). Upstream's spelling.
    """

    def __init__(self, ignore_index=255, epsilon=1e-6):
        super().__init__()
        self.ignore_index = ignore_index
        self.epsilon = epsilon

    def forward(self, logits, labels, step=None, obj_nums=None):
        """``logits`` ``(B, C, H, W)``, ``labels`` ``(B, [1,] H, W)`` int -> ``(B,)`` float32.

        ``step`` is unused; it is accepted so that both losses share one call signature.
        """
        if isinstance(logits, (list, tuple)):
            return _per_element(self, logits, labels, step=step)
        with _no_autocast(logits.device.type):
            z, y = _prepare(logits, labels, obj_nums, self.ignore_index, 'SoftJaccordLoss')
            C = z.shape[1]
            keep = (y != self.ignore_index).unsqueeze(1).float()  # (B, 1, HW)
            p = torch.softmax(z, dim=1) * keep
            g = (y.unsqueeze(1) == torch.arange(C, device=y.device)[None, :, None]).float() * keep
            inter = (p * g).sum(2)  # (B, C)
            false_pos = (p * (1.0 - g)).sum(2)  # p is 0 on ignored pixels
            false_neg = ((keep - p) * g).sum(2)  # (1 - p) g on kept pixels
            per_class = 1.0 - inter / (inter + false_pos + false_neg + self.epsilon)
            present = (g.sum(2) > 0).float()
            return (per_class * present).sum(1) / present.sum(1).clamp_min(1.0)


# The correct spelling, for new code.
SoftJaccardLoss = SoftJaccordLoss
