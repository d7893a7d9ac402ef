"""Cascaded refinement network (Chen & Koltun, ICCV 2017), for image-to-image on the HR grid.

A cascade of refinement modules from coarse to fine, each doubling the resolution: module i
takes the input resampled (average pooling) to its resolution concatenated with the
bi/trilinearly upsampled features of module i-1, and applies two 3x3 convolutions each followed by
layer normalisation (GroupNorm with one group) and LeakyReLU 0.2; a 1x1 convolution gives the
output. Widths decrease from the coarsest to the finest module (1024 ... 128 in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bone3d.nets.blocks import conv, interpolate


class _Refine(nn.Module):
    def __init__(self, d: int, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            conv(d, cin, cout, 3), nn.GroupNorm(1, cout), nn.LeakyReLU(0.2, True),
            conv(d, cout, cout, 3), nn.GroupNorm(1, cout), nn.LeakyReLU(0.2, True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CRN(nn.Module):
    """Input (B, C_in, *S), S divisible by 2**(len(channels) - 1)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (1024, 1024, 1024, 512, 512, 256, 128),
    ):
        super().__init__()
        d = spatial_dims
        self.levels = len(channels)
        self.spatial_dims = d
        mods = [_Refine(d, in_channels, channels[0])]
        for i in range(1, len(channels)):
            mods.append(_Refine(d, in_channels + channels[i - 1], channels[i]))
        self.modules_ = nn.ModuleList(mods)
        self.out = conv(d, channels[-1], out_channels, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = [x]
        for _ in range(self.levels - 1):
            pyramid.append(
                F.avg_pool2d(pyramid[-1], 2)
                if self.spatial_dims == 2
                else F.avg_pool3d(pyramid[-1], 2)
            )
        h = torch.zeros(0)
        i = 0
        for m in self.modules_:
            inp = pyramid[self.levels - 1 - i]
            if i == 0:
                h = m(inp)
            else:
                h = m(torch.cat([inp, interpolate(h, [2] * self.spatial_dims, "linear")], 1))
            i += 1
        return self.out(h)


PRESETS = {
    "paper": {"channels": (1024, 1024, 1024, 512, 512, 256, 128)},
    "cpu3d": {"channels": (64, 64, 32, 16)},
    "tiny": {"channels": (8, 8, 4)},
}
