"""StarGAN (Choi et al., CVPR 2018): domain-conditioned generator and a discriminator with a
real/fake (source) head and a domain-classification head.

As in yunjey/stargan ``model.py``: G takes the image with the target-domain one-hot vector
broadcast to image channels, 7x7 stem, two 4x4 stride-2 downsamplings, ``repeat_num`` residual
blocks, two 4x4 transposed upsamplings, 7x7 tanh; instance norm with affine and running stats,
no conv bias. D: ``repeat_num`` 4x4 stride-2 convolutions with LeakyReLU(0.01) and zero padding,
then a 3x3 source head and a domain head whose kernel covers the remaining map
(``image_size / 2**repeat_num``).
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import centre_offset, conv, conv_t, norm


class _Residual(nn.Module):
    def __init__(self, d: int, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            conv(d, ch, ch, 3, bias=False), norm(d, "instance_affine", ch), nn.ReLU(True),
            conv(d, ch, ch, 3, bias=False), norm(d, "instance_affine", ch),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class StarGANGenerator(nn.Module):
    """Input ``x`` (B, C_in, *S) and domain labels ``c`` (B, c_dim); output (B, C_out, *S)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        conv_dim: int = 64,
        c_dim: int = 5,
        repeat_num: int = 6,
    ):
        super().__init__()
        d = spatial_dims
        layers: list[nn.Module] = [
            conv(d, in_channels + c_dim, conv_dim, 7, bias=False),
            norm(d, "instance_affine", conv_dim),
            nn.ReLU(True),
        ]
        cur = conv_dim
        for _ in range(2):
            layers += [
                conv(d, cur, cur * 2, 4, stride=2, padding=1, bias=False),
                norm(d, "instance_affine", cur * 2),
                nn.ReLU(True),
            ]
            cur *= 2
        layers += [_Residual(d, cur) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [
                conv_t(d, cur, cur // 2, 4, stride=2, padding=1, bias=False),
                norm(d, "instance_affine", cur // 2),
                nn.ReLU(True),
            ]
            cur //= 2
        layers += [conv(d, cur, out_channels, 7, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shape = [c.shape[0], c.shape[1]] + [1] * self.spatial_dims
        cmap = c.reshape(shape).expand([c.shape[0], c.shape[1]] + list(x.shape[2:]))
        return self.main(torch.cat([x, cmap.to(x.dtype)], dim=1))


class StarGANDiscriminator(nn.Module):
    """Returns (source logits map, domain logits (B, c_dim))."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        image_size: int = 128,
        conv_dim: int = 64,
        c_dim: int = 5,
        repeat_num: int = 6,
    ):
        super().__init__()
        d = spatial_dims
        layers: list[nn.Module] = [
            conv(d, in_channels, conv_dim, 4, stride=2, padding=1),
            nn.LeakyReLU(0.01),
        ]
        cur = conv_dim
        for _ in range(1, repeat_num):
            layers += [conv(d, cur, cur * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            cur *= 2
        k = image_size // 2**repeat_num
        if k < 1:
            raise ValueError(f"image_size {image_size} too small for {repeat_num} layers")
        self.main = nn.Sequential(*layers)
        self.conv1 = conv(d, cur, 1, 3, padding=1, bias=False)
        self.conv2 = conv(d, cur, c_dim, k, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.main(x)
        # the domain head's kernel covers the whole map at ``image_size``; on a larger (or
        # non-cubic 3D) patch its outputs are averaged, so the logits stay (B, c_dim)
        return self.conv1(h), self.conv2(h).flatten(2).mean(2)


class StarGANTranslator(nn.Module):
    """A `StarGANGenerator` fixed to one target domain: ``forward(x)`` = ``G(x, onehot(target))``,
    the form bundles, inference and export use (input key ``image`` alone).

    ``G`` maps ``in_channels`` to ``in_channels`` (one generator serves both directions, so both
    domains have the same shape; a 2.5D slab translates to a slab). ``out_channels`` < ``in_channels``
    keeps the centre channels: the 2.5D prediction is the slab's centre slice. Domains in bone3d:
    0 = low-resolution CT, 1 = micro-CT (``target=1``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        conv_dim: int = 64,
        c_dim: int = 2,
        repeat_num: int = 6,
        target: int = 1,
    ):
        super().__init__()
        self.first = centre_offset(in_channels, out_channels)
        if not 0 <= target < c_dim:
            raise ValueError(f"target domain {target} not in 0..{c_dim - 1}")
        self.generator = StarGANGenerator(
            spatial_dims, in_channels, in_channels, conv_dim, c_dim, repeat_num
        )
        self.c_dim = c_dim
        self.target = target
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(x.shape[0], self.c_dim, dtype=x.dtype, device=x.device)
        c[:, self.target] = 1.0
        y = self.generator(x, c)
        return y[:, self.first : self.first + self.out_channels]


PRESETS_G = {
    "paper": {"conv_dim": 64, "c_dim": 5, "repeat_num": 6},
    "cpu3d": {"conv_dim": 16, "c_dim": 2, "repeat_num": 4},
    "tiny": {"conv_dim": 4, "c_dim": 2, "repeat_num": 2},
}
PRESETS_T = {k: {**v, "c_dim": 2} for k, v in PRESETS_G.items()}  # LR CT / micro-CT
PRESETS_D = {
    "paper": {"image_size": 128, "conv_dim": 64, "c_dim": 5, "repeat_num": 6},
    "cpu3d": {"image_size": 32, "conv_dim": 16, "c_dim": 2, "repeat_num": 4},
    "tiny": {"image_size": 16, "conv_dim": 4, "c_dim": 2, "repeat_num": 3},
}
