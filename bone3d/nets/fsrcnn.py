"""FSRCNN (Dong et al., ECCV 2016), FSRCNN(d, s, m): feature extraction 5 (d), shrinking 1 (s),
m mapping layers 3 (s), expanding 1 (d), all with PReLU, and a 9-wide transposed convolution
whose stride is the per-axis scale (post-upsampling, as published: the deconvolution carries
the scale, which is why it is kept instead of a pixel shuffle)."""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import as_scale, conv, conv_t


class FSRCNN(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        scale=2,
        d: int = 56,
        s: int = 12,
        m: int = 4,
    ):
        super().__init__()
        sd = spatial_dims
        sc = as_scale(scale, sd)
        layers: list[nn.Module] = [
            conv(sd, in_channels, d, 5),
            nn.PReLU(d),
            conv(sd, d, s, 1),
            nn.PReLU(s),
        ]
        for _ in range(m):
            layers += [conv(sd, s, s, 3), nn.PReLU(s)]
        layers += [conv(sd, s, d, 1), nn.PReLU(d)]
        self.body = nn.Sequential(*layers)
        self.deconv = conv_t(
            sd,
            d,
            out_channels,
            9,
            stride=tuple(sc),
            padding=4,
            output_padding=tuple(v - 1 for v in sc),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.body(x))


PRESETS = {
    "paper": {"d": 56, "s": 12, "m": 4},
    "cpu3d": {"d": 32, "s": 12, "m": 4},
    "tiny": {"d": 8, "s": 4, "m": 2},
}
