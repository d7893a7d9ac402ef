"""EDSR (Lim et al., CVPRW 2017): head conv, ``n_resblocks`` residual blocks (conv-ReLU-conv,
scaled by ``res_scale``, no batch norm) plus a body conv with a long skip, sub-pixel upsampling
(one conv + shuffle per prime factor of the per-axis scale), tail conv. No RGB mean shift is
baked in (bone3d normalises intensities in the data pipeline)."""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import PixelShuffleUp, as_scale, conv


class _ResBlock(nn.Module):
    def __init__(self, d: int, nf: int, res_scale: float):
        super().__init__()
        self.body = nn.Sequential(conv(d, nf, nf, 3), nn.ReLU(True), conv(d, nf, nf, 3))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class EDSR(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        scale=2,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
    ):
        super().__init__()
        d = spatial_dims
        self.head = conv(d, in_channels, n_feats, 3)
        self.body = nn.Sequential(
            *[_ResBlock(d, n_feats, res_scale) for _ in range(n_resblocks)],
            conv(d, n_feats, n_feats, 3),
        )
        self.up = PixelShuffleUp(d, n_feats, as_scale(scale, d))
        self.tail = conv(d, n_feats, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.up(h + self.body(h)))


PRESETS = {
    "paper": {"n_resblocks": 32, "n_feats": 256, "res_scale": 0.1},
    "baseline": {"n_resblocks": 16, "n_feats": 64, "res_scale": 1.0},
    "cpu3d": {"n_resblocks": 8, "n_feats": 32, "res_scale": 1.0},
    "tiny": {"n_resblocks": 2, "n_feats": 8, "res_scale": 1.0},
}
