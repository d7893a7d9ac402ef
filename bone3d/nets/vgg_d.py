"""VGG-style discriminator of ESRGAN/SRGAN (``Discriminator_VGG_128``, Wang et al. 2018).

Five stages of (3x3 conv, 4x4 stride-2 conv) with batch norm (no bias after norm) and LeakyReLU
0.2, widths nf, 2nf, 4nf, 8nf, 8nf, then two linear layers (-> 100 -> 1). The first linear
layer's size follows the patch: ``8 nf * (patch / 32) ** spatial_dims`` (128 px -> 4x4).
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import conv, norm


class VGGDiscriminator(nn.Module):
    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, nf: int = 64, patch_size: int = 128
    ):
        super().__init__()
        d = spatial_dims
        if patch_size % 32:
            raise ValueError("patch_size must be a multiple of 32")
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8]
        layers: list[nn.Module] = [conv(d, in_channels, nf, 3), nn.LeakyReLU(0.2, True)]
        layers += [
            conv(d, nf, nf, 4, 2, 1, bias=False),
            norm(d, "batch", nf),
            nn.LeakyReLU(0.2, True),
        ]
        prev = nf
        for w in widths[1:]:
            layers += [
                conv(d, prev, w, 3, bias=False),
                norm(d, "batch", w),
                nn.LeakyReLU(0.2, True),
            ]
            layers += [
                conv(d, w, w, 4, 2, 1, bias=False),
                norm(d, "batch", w),
                nn.LeakyReLU(0.2, True),
            ]
            prev = w
        self.features = nn.Sequential(*layers)
        n_in = prev * (patch_size // 32) ** d
        self.classifier = nn.Sequential(
            nn.Linear(n_in, 100), nn.LeakyReLU(0.2, True), nn.Linear(100, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


PRESETS = {
    "paper": {"nf": 64, "patch_size": 128},
    "cpu3d": {"nf": 16, "patch_size": 64},
    "tiny": {"nf": 2, "patch_size": 32},
}
