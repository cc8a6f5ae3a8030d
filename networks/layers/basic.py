"""Small building blocks shared by the propagation modules and the decoder.

Shapes: sequence-first tokens are ``(L, B, C)`` with ``L = h * w`` in row-major order;
2D maps are ``(B, C, h, w)``.
"""
import torch.nn as nn
import torch.nn.functional as F


def seq_to_2d(x, size_2d):
    """``(L, B, C)`` tokens -> contiguous ``(B, C, h, w)`` map."""
    h, w = size_2d
    L, B, C = x.shape
    return x.view(h, w, B, C).permute(2, 3, 0, 1).contiguous()


def map_to_seq(x):
    """``(B, C, h, w)`` map -> ``(h*w, B, C)`` tokens."""
    B, C, h, w = x.shape
    # Contiguous: a Linear on the permuted view falls, under CPU bf16 autocast, into a batched
    # matmul over an L-times expanded weight (seconds per frame at 480p); in fp32 the matmul
    # made this same copy itself.
    return x.reshape(B, C, h * w).permute(2, 0, 1).contiguous()


class DWConv2d(nn.Module):
    """Depthwise 5x5 convolution over sequence-first tokens, then channel dropout.

    Upstream key name: ``<prefix>.conv.weight`` of shape ``(C, 1, 5, 5)``, no bias.
    """

    def __init__(self, channels, dropout=0.1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 5, padding=2, groups=channels, bias=False)
        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, x, size_2d):
        """``x``: ``(L, B, C)`` -> ``(L, B, C)``."""
        h, w = size_2d
        L, B, C = x.shape
        x2d = x.view(h, w, B, C).permute(2, 3, 0, 1)
        x2d = self.dropout(self.conv(x2d))
        return map_to_seq(x2d)   # contiguous, see map_to_seq


class GroupNorm1D(nn.Module):
    """GroupNorm over the channels of ``(L, B, C)`` tokens (key names ``<prefix>.gn.*``)."""

    def __init__(self, channels, groups=32, eps=1e-5):
        super().__init__()
        self.gn = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        return self.gn(x.permute(1, 2, 0)).permute(2, 0, 1)


class GNActDWConv2d(nn.Module):
    """GroupNorm -> GELU -> depthwise 5x5 (no bias); AOT's feed-forward middle."""

    def __init__(self, channels, gn_groups=32):
        super().__init__()
        self.gn = nn.GroupNorm(gn_groups, channels)
        self.conv = nn.Conv2d(channels, channels, 5, padding=2, groups=channels, bias=False)

    def forward(self, x, size_2d):
        h, w = size_2d
        L, B, C = x.shape
        x2d = x.view(h, w, B, C).permute(2, 3, 0, 1)
        x2d = self.conv(F.gelu(self.gn(x2d)))
        return x2d.reshape(B, C, L).permute(2, 0, 1)


class ConvGN(nn.Module):
    """Conv2d (with bias, 'same' padding) followed by GroupNorm(8)."""

    def __init__(self, in_dim, out_dim, kernel_size, gn_groups=8):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
        self.gn = nn.GroupNorm(gn_groups, out_dim)

    def forward(self, x):
        return self.gn(self.conv(x))


class DropPath(nn.Module):
    """Per-sample stochastic depth; ``batch_dim`` says which axis holds the samples."""

    def __init__(self, drop_prob=0.0, batch_dim=0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.batch_dim = batch_dim

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = [1] * x.ndim
        shape[self.batch_dim] = x.shape[self.batch_dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f'p={self.drop_prob}'


def layer_drop_path_rate(droppath, layer_idx, num_layers, scaling=False):
    """Drop-path rate of layer ``layer_idx``: constant, or (``scaling``) linear from 0 at the
    first layer to ``droppath`` at the last."""
    if not scaling:
        return droppath
    return 0.0 if num_layers == 1 else droppath * layer_idx / (num_layers - 1)
