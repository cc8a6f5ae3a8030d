"""ResNet-50/101 backbones truncated after ``layer3`` (output stride 16).

Following STM and upstream aot-benchmark, ``layer4`` and ``fc`` are not built: the 1/16 map of
``layer3`` is returned twice, as the "16x" and the "last" feature. Module names equal torchvision's
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv,bn}{1,2,3}``, ``downsample.{0,1}``), so
``resnet50-0676ba61.pth`` / ``resnet101-63fe2227.pth`` load by name once ``fc`` and ``layer4`` are
dropped. Bottleneck blocks stride in the 3x3 convolution (torchvision's "v1.5" layout).
"""
import math

import torch.nn as nn

from networks.layers.normalization import FrozenBatchNorm2d


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand (x4), plus the (projected) input."""

    expansion = 4

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None,
                 norm_layer=FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, dilation=dilation,
                               padding=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet stem + ``layer1..3`` returning ``[x4, x8, x16, x16]``.

    Args:
        layers: blocks per stage, ``(3, 4, 6)`` for ResNet-50 and ``(3, 4, 23)`` for ResNet-101
            (a 4th entry, torchvision-style, is accepted and ignored since layer4 is not built).
        output_stride: 16 (strides 1, 2, 2) or 8 (layer3 keeps stride 1 and uses dilation 2).
        norm_layer: ``FrozenBatchNorm2d`` or ``nn.BatchNorm2d``.
        freeze_at: ``>= 1`` freezes ``conv1``/``bn1``; ``>= 2`` ``layer1``; ``>= 3`` ``layer2``;
            ``>= 4`` ``layer3`` (``requires_grad = False``).

    Shapes: ``(B, 3, H, W)`` -> ``(B, 256, H/4, W/4)``, ``(B, 512, H/8, W/8)``,
    ``(B, 1024, H/16, W/16)`` twice (the same tensor object, as upstream).
    """

    def __init__(self, layers, output_stride=16, norm_layer=FrozenBatchNorm2d, freeze_at=0,
                 in_channels=3, block=Bottleneck):
        super().__init__()
        if output_stride == 16:
            strides, dilations = (1, 2, 2), (1, 1, 1)
        elif output_stride == 8:
            strides, dilations = (1, 2, 1), (1, 1, 2)
        else:
            raise ValueError(f'ResNet supports output_stride 8 or 16, got {output_stride}')
        self._in_ch = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], strides[0], dilations[0], norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], strides[1], dilations[1], norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], strides[2], dilations[2], norm_layer)
        self.out_channels = [64 * block.expansion, 128 * block.expansion,
                             256 * block.expansion, 256 * block.expansion]

        self._init_weights()
        self.freeze(freeze_at)

    def _make_layer(self, block, planes, num_blocks, stride, dilation, norm_layer):
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_ch),
            )
        # The entry block of a dilated stage uses half the dilation (DeepLab's rule, as upstream).
        blocks = [block(self._in_ch, planes, stride, max(dilation // 2, 1), downsample, norm_layer)]
        self._in_ch = out_ch
        blocks += [block(out_ch, planes, dilation=dilation, norm_layer=norm_layer)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def freeze(self, freeze_at):
        """Set ``requires_grad = False`` on the stem (``>= 1``) and ``layer1..freeze_at-1``."""
        frozen = [self.conv1, self.bn1] if freeze_at >= 1 else []
        frozen += [stage for k, stage in enumerate((self.layer1, self.layer2, self.layer3), start=2)
                   if freeze_at >= k]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x):
        """``x``: ``(B, 3, H, W)`` -> ``[x4, x8, x16, x16]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x4 = self.layer1(x)
        x8 = self.layer2(x4)
        x16 = self.layer3(x8)
        return [x4, x8, x16, x16]


def resnet50(output_stride=16, norm_layer=FrozenBatchNorm2d, freeze_at=0):
    """ResNet-50 without layer4 (8.5 M parameters)."""
    return ResNet((3, 4, 6), output_stride, norm_layer, freeze_at)


def resnet101(output_stride=16, norm_layer=FrozenBatchNorm2d, freeze_at=0):
    """ResNet-101 without layer4."""
    return ResNet((3, 4, 23), output_stride, norm_layer, freeze_at)
