"""CycleGAN (Zhu et al., ICCV 2017) ResNet generator; its discriminator is
`bone3d.nets.pix2pix.NLayerDiscriminator` with instance norm.

As in junyanz/pytorch-CycleGAN-and-pix2pix ``ResnetGenerator``: reflection-padded 7x7 stem,
two stride-2 downsamplings, ``n_blocks`` ResNet blocks (9 for 256 px), two transposed-conv
upsamplings, 7x7 tanh output; instance norm without affine, so convolutions keep their bias.
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import ReflectPad, ResnetBlock, conv, conv_t, norm


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
        d = spatial_dims
        bias = norm_kind != "batch"
        layers: list[nn.Module] = [
            ReflectPad(d, 3),
            conv(d, in_channels, ngf, 7, padding=0, bias=bias),
            norm(d, norm_kind, ngf),
            nn.ReLU(True),
        ]
        for i in range(n_downsampling):
            m = 2**i
            layers += [
                conv(d, ngf * m, ngf * m * 2, 3, stride=2, padding=1, bias=bias),
                norm(d, norm_kind, ngf * m * 2),
                nn.ReLU(True),
            ]
        m = 2**n_downsampling
        layers += [ResnetBlock(d, ngf * m, norm_kind, bias=bias) for _ in range(n_blocks)]
        for i in range(n_downsampling):
            m = 2 ** (n_downsampling - i)
            layers += [
                conv_t(
                    d, ngf * m, ngf * m // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                ),
                norm(d, norm_kind, ngf * m // 2),
                nn.ReLU(True),
            ]
        layers += [ReflectPad(d, 3), conv(d, ngf, out_channels, 7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)

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
