"""pix2pix (Isola et al., CVPR 2017): U-Net generator and PatchGAN discriminator.

As in junyanz/pytorch-CycleGAN-and-pix2pix: the U-Net has ``num_downs`` 4x4 stride-2 levels
(8 for 256 px patches: ``num_downs = log2(patch)``), LeakyReLU(0.2) down / ReLU up, skip
concatenation, dropout 0.5 in the three innermost decoder blocks, tanh output; convolutions
followed by batch norm have no bias. The N-layer PatchGAN (70x70 receptive field for 3 layers)
uses 4x4 kernels with padding 1 and takes the (input, output) pair concatenated on channels.
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import conv, conv_t, norm


class _UnetBlock(nn.Module):
    def __init__(
        self,
        d,
        outer,
        inner,
        in_ch,
        sub: nn.Module | None,
        outermost=False,
        innermost=False,
        norm_kind="batch",
        dropout=False,
    ):
        super().__init__()
        bias = norm_kind != "batch"
        self.outermost = outermost
        down_conv = conv(d, in_ch, inner, 4, stride=2, padding=1, bias=bias)
        if outermost:
            up = conv_t(d, inner * 2, outer, 4, stride=2, padding=1, bias=True)
            layers = (
                [down_conv] + ([sub] if sub is not None else []) + [nn.ReLU(True), up, nn.Tanh()]
            )
        elif innermost:
            up = conv_t(d, inner, outer, 4, stride=2, padding=1, bias=bias)
            layers = [
                nn.LeakyReLU(0.2, True),
                down_conv,
                nn.ReLU(True),
                up,
                norm(d, norm_kind, outer),
            ]
        else:
            up = conv_t(d, inner * 2, outer, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down_conv, norm(d, norm_kind, inner)]
            layers += ([sub] if sub is not None else []) + [
                nn.ReLU(True),
                up,
                norm(d, norm_kind, outer),
            ]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix G. Paper (U-Net-256): ngf 64, num_downs 8, batch norm, dropout."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        num_downs: int = 8,
        norm_kind: str = "batch",
        dropout: bool = True,
    ):
        super().__init__()
        d = spatial_dims
        if num_downs < 5:
            raise ValueError("num_downs must be >= 5")
        block = _UnetBlock(d, ngf * 8, ngf * 8, ngf * 8, None, innermost=True, norm_kind=norm_kind)
        for _ in range(num_downs - 5):
            block = _UnetBlock(
                d, ngf * 8, ngf * 8, ngf * 8, block, norm_kind=norm_kind, dropout=dropout
            )
        block = _UnetBlock(d, ngf * 4, ngf * 8, ngf * 4, block, norm_kind=norm_kind)
        block = _UnetBlock(d, ngf * 2, ngf * 4, ngf * 2, block, norm_kind=norm_kind)
        block = _UnetBlock(d, ngf, ngf * 2, ngf, block, norm_kind=norm_kind)
        self.model = _UnetBlock(
            d, out_channels, ngf, in_channels, block, outermost=True, norm_kind=norm_kind
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN / CycleGAN N-layer discriminator (4x4 kernels, padding 1)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        ndf: int = 64,
        n_layers: int = 3,
        norm_kind: str = "batch",
    ):
        super().__init__()
        d = spatial_dims
        bias = norm_kind != "batch"
        layers: list[nn.Module] = [
            conv(d, in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                conv(d, ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                norm(d, norm_kind, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            conv(d, ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
            norm(d, norm_kind, ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
        layers.append(conv(d, ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


PRESETS_G = {
    "paper": {"ngf": 64, "num_downs": 8},
    "cpu3d": {"ngf": 16, "num_downs": 5},
    "tiny": {"ngf": 2, "num_downs": 5, "norm_kind": "instance"},
}
PRESETS_D = {
    "paper": {"ndf": 64, "n_layers": 3},
    "cpu3d": {"ndf": 16, "n_layers": 3},
    "tiny": {"ndf": 4, "n_layers": 2},
}
