"""SRCNN (Dong et al., ECCV 2014 / TPAMI 2016), the 9-5-5 network on a pre-upsampled input.

Three convolutions (patch extraction 9, non-linear mapping 5, reconstruction 5) with ReLU and
zero 'same' padding; the LR volume is interpolated to the HR grid before the network, as in the
paper (so it takes no ``scale``).
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import conv


class SRCNN(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        n1: int = 64,
        n2: int = 32,
        f1: int = 9,
        f2: int = 5,
        f3: int = 5,
    ):
        super().__init__()
        d = spatial_dims
        self.body = nn.Sequential(
            conv(d, in_channels, n1, f1),
            nn.ReLU(True),
            conv(d, n1, n2, f2),
            nn.ReLU(True),
            conv(d, n2, out_channels, f3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


PRESETS = {
    "paper": {"n1": 64, "n2": 32, "f1": 9, "f2": 5, "f3": 5},
    "cpu3d": {"n1": 32, "n2": 16, "f1": 5, "f2": 3, "f3": 3},
    "tiny": {"n1": 8, "n2": 4, "f1": 3, "f2": 3, "f3": 3},
}
