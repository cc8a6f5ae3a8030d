"""Sine position embedding (AOT adds it to self-attention Q/K; DeAOT ignores it)."""
import math

import torch
import torch.nn as nn


class PositionEmbeddingSine(nn.Module):
    """``(B, C, h, w)`` -> ``(1, 2*num_pos_feats, h, w)``.

    Coordinates are integer grids starting at 0, normalised to ``[0, scale]`` by
    ``y / (h - 1 + eps)``; channels are ``[pos_y | pos_x]``, each interleaving sin/cos.
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError('normalize should be True if scale is passed')
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x):
        h, w = x.shape[-2:]
        y = torch.arange(h, dtype=torch.float32, device=x.device).view(h, 1).expand(h, w)
        xx = torch.arange(w, dtype=torch.float32, device=x.device).view(1, w).expand(h, w)
        if self.normalize:
            eps = 1e-6
            y = y / (h - 1 + eps) * self.scale
            xx = xx / (w - 1 + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode='floor') / self.num_pos_feats)

        def encode(p):
            p = p[..., None] / dim_t                                  # (h, w, F)
            return torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], dim=3).flatten(2)

        pos = torch.cat([encode(y), encode(xx)], dim=2)               # (h, w, 2F)
        return pos.permute(2, 0, 1).unsqueeze(0)
