"""Image encoders: ``build_encoder(name, frozen_bn, freeze_at)`` and their output channels.

Every encoder maps ``(B, 3, H, W)`` to a list of four maps ``[x4, x8, x16, x16b]`` at strides
4, 8, 16, 16 with ``ENCODER_DIMS[name]`` channels. ``x16b`` is MobileNetV2's 1280-channel head
map, and the ``x16`` tensor itself for ResNet and Swin (upstream's "last" feature, which the VOS
model projects to the embedding width).

Building an encoder never reads a weight file; ImageNet weights are loaded separately with
:func:`networks.encoders.pretrained.load_imagenet_weights`.
"""
import torch.nn as nn

from networks.layers.normalization import FrozenBatchNorm2d

from .mobilenetv2 import MobileNetV2
from .resnet import ResNet, resnet50, resnet101
from .swin import SwinTransformer, build_swin

ENCODER_DIMS = {
    'mobilenetv2': [24, 32, 96, 1280],
    'resnet50': [256, 512, 1024, 1024],
    'resnet101': [256, 512, 1024, 1024],
    'swin_base': [128, 256, 512, 512],
}


def build_encoder(name, frozen_bn=True, freeze_at=-1):
    """Build encoder ``name`` (an upstream ``MODEL_ENCODER`` value).

    Args:
        name: one of ``ENCODER_DIMS`` (``mobilenetv2``, ``resnet50``, ``resnet101``, ``swin_base``).
        frozen_bn: CNNs use ``FrozenBatchNorm2d`` (upstream ``MODEL_FREEZE_BN``) or, if False,
            trainable ``nn.BatchNorm2d``. Swin uses LayerNorm and ignores it.
        freeze_at: upstream ``TRAIN_ENCODER_FREEZE_AT`` (2 in every config): parameters of the stem
            and of the first ``freeze_at - 1`` stages get ``requires_grad = False``. See each
            encoder's ``freeze`` for the exact rule (Swin freezes its patch embedding from 0 on).
    """
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    if name == 'mobilenetv2':
        return MobileNetV2(16, norm_layer, freeze_at=freeze_at)
    if name == 'resnet50':
        return resnet50(16, norm_layer, freeze_at=freeze_at)
    if name == 'resnet101':
        return resnet101(16, norm_layer, freeze_at=freeze_at)
    if name == 'swin_base':
        return build_swin('swin_base', freeze_at=freeze_at)
    raise ValueError(f'unknown encoder {name!r}; known encoders: {", ".join(ENCODER_DIMS)}')


__all__ = ['ENCODER_DIMS', 'build_encoder', 'MobileNetV2', 'ResNet', 'SwinTransformer',
           'FrozenBatchNorm2d']
