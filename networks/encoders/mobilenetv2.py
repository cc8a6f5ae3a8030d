"""MobileNetV2 backbone with output stride 16 (the encoder of AOT/DeAOT T, S, B and L).

The module tree mirrors torchvision's ``mobilenet_v2`` (``features.0`` .. ``features.18``, blocks
with a ``conv`` Sequential), so torchvision's ``mobilenet_v2-b0353104.pth`` and upstream
aot-benchmark checkpoints load by name. There is no classifier.

Once the running stride reaches 16, later stride-2 stages keep stride 1 and dilate their depthwise
convolutions instead (blocks 15-17 get dilation 2), so the last two outputs stay at 1/16.
"""
import torch.nn as nn

from networks.layers.normalization import FrozenBatchNorm2d

# (expand ratio t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# Index of the last ``features`` entry of each output stage: x4 = features[0:4], x8 = [4:7],
# x16 = [7:14], x16b = [14:19].
STAGE_ENDS = (3, 6, 13, 18)


def _make_divisible(value, divisor, min_value=None):
    """Round ``value`` to a multiple of ``divisor`` without dropping more than 10 %."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> norm -> ReLU6; children ``0``, ``1``, ``2`` as in torchvision."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1, dilation=1,
                 norm_layer=FrozenBatchNorm2d):
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear), with a skip when shapes allow.

    ``conv`` holds ``[ConvBNReLU pw, ConvBNReLU dw, Conv1x1, norm]``, without the first entry when
    ``expand_ratio == 1``.
    """

    def __init__(self, in_ch, out_ch, stride, dilation, expand_ratio,
                 norm_layer=FrozenBatchNorm2d):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'InvertedResidual stride must be 1 or 2, got {stride}')
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel_size=1, norm_layer=norm_layer))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, dilation=dilation, groups=hidden,
                       norm_layer=norm_layer),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            norm_layer(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor returning ``[x4, x8, x16, x16b]``.

    Args:
        output_stride: 16 (upstream default for VOS) or 8.
        norm_layer: ``FrozenBatchNorm2d`` (upstream ``MODEL_FREEZE_BN``) or ``nn.BatchNorm2d``.
        freeze_at: ``>= 1`` freezes ``features[0]``; ``>= k`` (k = 2..5) also freezes output stage
            ``k - 1`` (stage 1 = ``features[0:4]``, 2 = ``[4:7]``, 3 = ``[7:14]``, 4 = ``[14:19]``).
            Frozen means ``requires_grad = False``; FrozenBN statistics are buffers in any case.
        width_mult, round_nearest: channel scaling as in torchvision (1.0 / 8 for the checkpoints).

    Shapes: ``(B, 3, H, W)`` -> ``(B, 24, H/4, W/4)``, ``(B, 32, H/8, W/8)``,
    ``(B, 96, H/16, W/16)``, ``(B, 1280, H/16, W/16)`` (sizes rounded up by the stride-2 convs).
    """

    def __init__(self, output_stride=16, norm_layer=FrozenBatchNorm2d, freeze_at=0,
                 width_mult=1.0, round_nearest=8):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f'MobileNetV2 supports output_stride 8 or 16, got {output_stride}')
        in_ch = _make_divisible(32 * width_mult, round_nearest)
        last_ch = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features = [ConvBNReLU(3, in_ch, stride=2, norm_layer=norm_layer)]
        channels = [in_ch]  # output channels of every ``features`` entry
        current_stride, rate = 2, 1
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            if current_stride == output_stride:
                # Stride budget spent: keep the resolution and grow the dilation instead. The first
                # block of the stage still uses the previous rate (upstream's DeepLab-style rule).
                stride, first_dilation = 1, rate
                rate *= s
            else:
                stride, first_dilation = s, 1
                current_stride *= s
            out_ch = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(
                    in_ch, out_ch, stride if i == 0 else 1, first_dilation if i == 0 else rate,
                    t, norm_layer=norm_layer))
                channels.append(out_ch)
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, last_ch, kernel_size=1, norm_layer=norm_layer))
        channels.append(last_ch)
        self.features = nn.Sequential(*features)
        self.out_channels = [channels[i] for i in STAGE_ENDS]

        self._init_weights()
        self.freeze(freeze_at)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stage_modules(self):
        """The four output stages as lists of ``features`` entries (not registered submodules)."""
        starts = (0,) + tuple(e + 1 for e in STAGE_ENDS[:-1])
        return [list(self.features[a:b + 1]) for a, b in zip(starts, STAGE_ENDS)]

    def freeze(self, freeze_at):
        """Set ``requires_grad = False`` on the stem (``>= 1``) and stages ``1..freeze_at-1``."""
        frozen = []
        if freeze_at >= 1:
            frozen.append(self.features[0])
        for k, stage in enumerate(self.stage_modules(), start=2):
            if freeze_at >= k:
                frozen += stage
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x):
        """``x``: ``(B, 3, H, W)`` -> ``[x4, x8, x16, x16b]``."""
        outs = []
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in STAGE_ENDS:
                outs.append(x)
        return outs
