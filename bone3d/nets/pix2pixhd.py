"""pix2pixHD (Wang et al., CVPR 2018): global generator, local enhancer, multiscale discriminator.

As in the reference implementation (NVIDIA/pix2pixHD ``networks.py``): instance norm without
affine, reflection padding, 7x7 stem, stride-2 3x3 down/transposed-up convolutions, ResNet blocks
at the bottleneck, tanh output; the local enhancer wraps a global generator of twice the width
(its last layers removed) that sees the input average-pooled by 2; the discriminator is a set of
``num_D`` N-layer PatchGANs (4x4 kernels, padding 2) applied to the input average-pooled by
3x3 / stride 2 (``count_include_pad=False``) between scales, returning every layer's features for
the feature-matching loss.

Shapes: generators ``(B, C_in, *S) -> (B, C_out, *S)`` with ``S`` divisible by
``2**(n_downsampling + n_local_enhancers)``; the discriminator returns a list (one per scale) of
lists of feature maps, the last being the patch logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bone3d.nets.blocks import ReflectPad, ResnetBlock, avg_pool, conv, conv_t, norm


def _global_layers(
    d, cin, cout, ngf, n_down, n_blocks, norm_kind, final: bool, bias: bool = True
) -> list[nn.Module]:
    """The ResNet-generator body shared by pix2pixHD's G1 and CycleGAN's generator (pix2pixHD
    built its global generator on it): 7x7 stem, stride-2 downsamplings, ResNet blocks,
    transposed-conv upsamplings and, with ``final``, the 7x7 tanh output."""
    layers: list[nn.Module] = [
        ReflectPad(d, 3),
        conv(d, cin, ngf, 7, padding=0, bias=bias),
        norm(d, norm_kind, ngf),
        nn.ReLU(True),
    ]
    for i in range(n_down):
        m = 2**i
        layers += [
            conv(d, ngf * m, ngf * m * 2, 3, stride=2, padding=1, bias=bias),
            norm(d, norm_kind, ngf * m * 2),
            nn.ReLU(True),
        ]
    m = 2**n_down
    layers += [ResnetBlock(d, ngf * m, norm_kind, bias=bias) for _ in range(n_blocks)]
    for i in range(n_down):
        m = 2 ** (n_down - i)
        layers += [
            conv_t(d, ngf * m, ngf * m // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
            norm(d, norm_kind, ngf * m // 2),
            nn.ReLU(True),
        ]
    if final:
        layers += [ReflectPad(d, 3), conv(d, ngf, cout, 7, padding=0), nn.Tanh()]
    return layers


class GlobalGenerator(nn.Module):
    """pix2pixHD G1. Paper: ngf 64, 4 downsamplings, 9 ResNet blocks."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_downsampling: int = 4,
        n_blocks: int = 9,
        norm_kind: str = "instance",
    ):
        super().__init__()
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
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LocalEnhancer(nn.Module):
    """pix2pixHD G = G1 (at half resolution, width ngf * 2**n) + n local enhancer branches G2."""

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, ngf: int = 32,
        n_downsample_global: int = 4, n_blocks_global: int = 9, n_local_enhancers: int = 1,
        n_blocks_local: int = 3, norm_kind: str = "instance",
    ):  # fmt: skip
        super().__init__()
        d = spatial_dims
        self.n_local_enhancers = n_local_enhancers
        ngf_global = ngf * 2**n_local_enhancers
        self.global_model = nn.Sequential(
            *_global_layers(
                d,
                in_channels,
                out_channels,
                ngf_global,
                n_downsample_global,
                n_blocks_global,
                norm_kind,
                False,
            )
        )
        self.downsample = avg_pool(d, 3, 2, padding=1, count_include_pad=False)
        self.branches = nn.ModuleList()
        for n in range(1, n_local_enhancers + 1):
            g = ngf * 2 ** (n_local_enhancers - n)
            down = nn.Sequential(
                    ReflectPad(d, 3), conv(d, in_channels, g, 7, padding=0), norm(d, norm_kind, g), nn.ReLU(True),
                    conv(d, g, g * 2, 3, stride=2, padding=1), norm(d, norm_kind, g * 2), nn.ReLU(True),
            )  # fmt: skip
            up: list[nn.Module] = [ResnetBlock(d, g * 2, norm_kind) for _ in range(n_blocks_local)]
            up += [
                conv_t(d, g * 2, g, 3, stride=2, padding=1, output_padding=1),
                norm(d, norm_kind, g),
                nn.ReLU(True),
            ]
            if n == n_local_enhancers:
                up += [ReflectPad(d, 3), conv(d, ngf, out_channels, 7, padding=0), nn.Tanh()]
            self.branches.append(_LocalBranch(down, nn.Sequential(*up)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = [x]
        for _ in range(self.n_local_enhancers):
            pyramid.append(self.downsample(pyramid[-1]))
        out = self.global_model(pyramid[-1])
        i = 0
        for branch in self.branches:
            out = branch(pyramid[self.n_local_enhancers - 1 - i], out)
            i += 1
        return out


class _LocalBranch(nn.Module):
    """One local enhancer: its own downsampling of the finer input, added to the coarser
    output, then ResNet blocks and upsampling."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down = down
        self.up = up

    def forward(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x) + coarse)


class NLayerDiscriminatorHD(nn.Module):
    """pix2pixHD's N-layer PatchGAN (4x4 kernels, padding 2), every layer's output exposed."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm_kind: str = "instance",
    ):
        super().__init__()
        d, kw = spatial_dims, 4
        pw = int(math.ceil((kw - 1.0) / 2))
        seq = [[conv(d, in_channels, ndf, kw, stride=2, padding=pw), nn.LeakyReLU(0.2, True)]]
        nf = ndf
        for _ in range(1, n_layers):
            prev, nf = nf, min(nf * 2, 512)
            seq.append(
                [
                    conv(d, prev, nf, kw, stride=2, padding=pw),
                    norm(d, norm_kind, nf),
                    nn.LeakyReLU(0.2, True),
                ]
            )
        prev, nf = nf, min(nf * 2, 512)
        seq.append(
            [
                conv(d, prev, nf, kw, stride=1, padding=pw),
                norm(d, norm_kind, nf),
                nn.LeakyReLU(0.2, True),
            ]
        )
        seq.append([conv(d, nf, 1, kw, stride=1, padding=pw)])
        self.layers = nn.ModuleList([nn.Sequential(*s) for s in seq])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``num_D`` discriminators on the input average-pooled (3x3, stride 2, no pad counting)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        ndf: int = 64,
        n_layers: int = 3,
        num_D: int = 3,
        norm_kind: str = "instance",
    ):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [
                NLayerDiscriminatorHD(spatial_dims, in_channels, ndf, n_layers, norm_kind)
                for _ in range(num_D)
            ]
        )
        self.downsample = avg_pool(spatial_dims, 3, 2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out: list[list[torch.Tensor]] = []
        for disc in self.discriminators:
            out.append(disc(x))
            x = self.downsample(x)
        return out


PRESETS_GLOBAL = {
    "paper": {"ngf": 64, "n_downsampling": 4, "n_blocks": 9},
    "cpu3d": {"ngf": 16, "n_downsampling": 3, "n_blocks": 4},
    "tiny": {"ngf": 4, "n_downsampling": 2, "n_blocks": 1},
}
PRESETS_LOCAL = {
    "paper": {
        "ngf": 32,
        "n_downsample_global": 4,
        "n_blocks_global": 9,
        "n_local_enhancers": 1,
        "n_blocks_local": 3,
    },
    "cpu3d": {
        "ngf": 8,
        "n_downsample_global": 2,
        "n_blocks_global": 3,
        "n_local_enhancers": 1,
        "n_blocks_local": 2,
    },
    "tiny": {
        "ngf": 2,
        "n_downsample_global": 1,
        "n_blocks_global": 1,
        "n_local_enhancers": 1,
        "n_blocks_local": 1,
    },
}
PRESETS_MSD = {
    "paper": {"ndf": 64, "n_layers": 3, "num_D": 3},
    "cpu3d": {"ndf": 16, "n_layers": 3, "num_D": 2},
    "tiny": {"ndf": 4, "n_layers": 2, "num_D": 2},
}
