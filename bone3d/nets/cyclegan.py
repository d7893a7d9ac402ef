"""CycleGAN (Zhu et al., ICCV 2017) ResNet generator; its discriminator is
`bone3d.nets.pix2pix.NLayerDiscriminator` with instance norm.

As in junyanz/pytorch-CycleGAN-and-pix2pix ``ResnetGenerator``: reflection-padded 7x7 stem,
two stride-2 downsamplings, ``n_blocks`` ResNet blocks (9 for 256 px), two transposed-conv
upsamplings, 7x7 tanh output; instance norm without affine, so convolutions keep their bias.
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.pix2pixhd import _global_layers


class ResnetGenerator(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        n_downsampling: int = 2,
        norm_kind: str = "instance",
    ):
        super().__init__()
        bias = norm_kind != "batch"  # the reference drops conv bias before batch norm
        self.model = nn.Sequential(
            *_global_layers(
                spatial_dims,
                in_channels,
                out_channels,
                ngf,
                n_downsampling,
                n_blocks,
                norm_kind,
                True,
                bias=bias,
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


PRESETS = {
    "paper": {"ngf": 64, "n_blocks": 9},
    "cpu3d": {"ngf": 16, "n_blocks": 6},
    "tiny": {"ngf": 4, "n_blocks": 2},
}
PRESETS_D = {
    "paper": {"ndf": 64, "n_layers": 3, "norm_kind": "instance"},
    "cpu3d": {"ndf": 16, "n_layers": 3, "norm_kind": "instance"},
    "tiny": {"ndf": 4, "n_layers": 2, "norm_kind": "instance"},
}
