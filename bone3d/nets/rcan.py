"""RCAN (Zhang et al., ECCV 2018): residual-in-residual groups of residual channel-attention
blocks (RCAB: conv-ReLU-conv + squeeze-excitation with reduction 16), a long skip, sub-pixel
upsampling per prime factor of the per-axis scale and a tail conv; no RGB mean shift."""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import ChannelAttention, PixelShuffleUp, as_scale, conv


class RCAB(nn.Module):
    def __init__(self, d: int, nf: int, reduction: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            conv(d, nf, nf, 3),
            nn.ReLU(True),
            conv(d, nf, nf, 3),
            ChannelAttention(d, nf, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualGroup(nn.Module):
    def __init__(self, d: int, nf: int, n_blocks: int, reduction: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            *[RCAB(d, nf, reduction) for _ in range(n_blocks)], conv(d, nf, nf, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class RCAN(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        scale=2,
        n_resgroups: int = 10,
        n_resblocks: int = 20,
        n_feats: int = 64,
        reduction: int = 16,
    ):
        super().__init__()
        d = spatial_dims
        self.head = conv(d, in_channels, n_feats, 3)
        self.body = nn.Sequential(
            *[ResidualGroup(d, n_feats, n_resblocks, reduction) for _ in range(n_resgroups)],
            conv(d, n_feats, n_feats, 3),
        )
        self.up = PixelShuffleUp(d, n_feats, as_scale(scale, d))
        self.tail = conv(d, n_feats, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.up(h + self.body(h)))


PRESETS = {
    "paper": {"n_resgroups": 10, "n_resblocks": 20, "n_feats": 64, "reduction": 16},
    "cpu3d": {"n_resgroups": 3, "n_resblocks": 4, "n_feats": 32, "reduction": 8},
    "tiny": {"n_resgroups": 1, "n_resblocks": 2, "n_feats": 8, "reduction": 4},
}
