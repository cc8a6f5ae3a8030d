"""Normalisation layers used by the encoders.

``FrozenBatchNorm2d`` is the BatchNorm of the ImageNet backbones with statistics *and* affine terms
fixed. Upstream (and detectron2) keep all four tensors as buffers, so they live in the state dict
under BatchNorm's names (``weight``, ``bias``, ``running_mean``, ``running_var``) and official
checkpoints load with ``strict=True``; there is no ``num_batches_tracked``.
"""
import torch
import torch.nn as nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms: ``y = x * scale + shift``.

    ``scale = weight * rsqrt(running_var + eps)`` and ``shift = bias - running_mean * scale`` are
    computed in the buffers' dtype and cast to the input dtype, so half/bfloat16 inputs stay in
    their dtype. One affine path serves training and inference (upstream switches to
    ``F.batch_norm`` without grad; the two agree to float rounding).

    Args:
        num_features: channels ``C``.
        eps: added to the variance. The default ``running_var`` is ``1 - eps`` so a fresh layer is
            the identity.

    Shapes: ``x`` ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer('weight', torch.ones(num_features))
        self.register_buffer('bias', torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features) - eps)

    def forward(self, x):
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        scale = scale.view(1, -1, 1, 1).to(x.dtype)
        shift = shift.view(1, -1, 1, 1).to(x.dtype)
        return x * scale + shift

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain BatchNorm state (torchvision files, a model trained with unfrozen BN) carries a
        # step counter that means nothing here; accept it instead of failing a strict load.
        state_dict.pop(prefix + 'num_batches_tracked', None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        return f'{self.num_features}, eps={self.eps}'
