"""RRDBNet, the ESRGAN generator (Wang et al., ECCVW 2018): residual-in-residual dense blocks
(3 dense blocks of 5 convs with growth ``gc``, LeakyReLU 0.2, residual scaling 0.2), a trunk
conv, then per x2 stage nearest-neighbour upsampling + conv + LeakyReLU (ESRGAN's upsampler,
kept instead of a pixel shuffle so the published network is the same), HR conv and output conv.
Stages follow the prime factors of the per-axis scale (a x3 stage uses nearest x3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bone3d.nets.blocks import as_scale, conv, interpolate, scale_stages


class _DenseBlock(nn.Module):
    def __init__(self, d: int, nf: int, gc: int):
        super().__init__()
        self.convs = nn.ModuleList([conv(d, nf + i * gc, gc, 3) for i in range(4)])
        self.last = conv(d, nf + 4 * gc, nf, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for c in self.convs:
            feats.append(F.leaky_relu(c(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.last(torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, d: int, nf: int, gc: int):
        super().__init__()
        self.blocks = nn.Sequential(
            _DenseBlock(d, nf, gc), _DenseBlock(d, nf, gc), _DenseBlock(d, nf, gc)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        scale=4,
        nf: int = 64,
        nb: int = 23,
        gc: int = 32,
    ):
        super().__init__()
        d = spatial_dims
        self.conv_first = conv(d, in_channels, nf, 3)
        self.trunk = nn.Sequential(*[RRDB(d, nf, gc) for _ in range(nb)])
        self.trunk_conv = conv(d, nf, nf, 3)
        self.stages = scale_stages(as_scale(scale, d))
        self.up_convs = nn.ModuleList([conv(d, nf, nf, 3) for _ in self.stages])
        self.hr_conv = conv(d, nf, nf, 3)
        self.conv_last = conv(d, nf, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.trunk(fea))
        i = 0
        for c in self.up_convs:
            fea = F.leaky_relu(c(interpolate(fea, self.stages[i], "nearest")), 0.2)
            i += 1
        return self.conv_last(F.leaky_relu(self.hr_conv(fea), 0.2))


PRESETS = {
    "paper": {"nf": 64, "nb": 23, "gc": 32},
    "cpu3d": {"nf": 24, "nb": 3, "gc": 12},
    "tiny": {"nf": 8, "nb": 1, "gc": 4},
}
