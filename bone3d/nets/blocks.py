"""Building blocks shared by the network zoo, dimension-agnostic through MONAI's factories.

Every block takes ``spatial_dims`` (2 or 3) and builds ``Conv[Conv.CONV, d]``,
``Norm[Norm.INSTANCE, d]`` etc., so one class is both the 2D and the 3D network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn


def conv(
    d: int,
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = True,
) -> nn.Module:
    """``Conv[Conv.CONV, d]`` with 'same' padding by default."""
    return Conv[Conv.CONV, d](
        cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias
    )


def conv_t(
    d: int, cin: int, cout: int, k: int, stride, padding: int, output_padding=0, bias: bool = True
) -> nn.Module:
    return Conv[Conv.CONVTRANS, d](
        cin, cout, k, stride=stride, padding=padding, output_padding=output_padding, bias=bias
    )


def norm(d: int, kind: str, ch: int) -> nn.Module:
    """'instance' (no affine, as pix2pix/pix2pixHD/CycleGAN), 'instance_affine' (StarGAN),
    'batch', or 'none'."""
    if kind == "instance":
        return Norm[Norm.INSTANCE, d](ch, affine=False, track_running_stats=False)
    if kind == "instance_affine":
        return Norm[Norm.INSTANCE, d](ch, affine=True, track_running_stats=True)
    if kind == "batch":
        return Norm[Norm.BATCH, d](ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def avg_pool(
    d: int, k: int, stride: int, padding: int = 0, count_include_pad: bool = True
) -> nn.Module:
    return Pool[Pool.AVG, d](k, stride=stride, padding=padding, count_include_pad=count_include_pad)


class ReflectPad(nn.Module):
    """Reflection padding of ``p`` voxels on every side (2D or 3D)."""

    def __init__(self, spatial_dims: int, p: int):
        super().__init__()
        self.pad = [p] * (2 * spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, mode="reflect")


def centre_offset(in_channels: int, out_channels: int) -> int:
    """Index of the first of ``out_channels`` centred channels among ``in_channels`` (a 2.5D
    slab-to-slab translator keeps the centre slice); refuses an off-centre choice."""
    if out_channels > in_channels or (in_channels - out_channels) % 2:
        raise ValueError(
            f"out_channels {out_channels} must be in_channels {in_channels} or a centred subset"
        )
    return (in_channels - out_channels) // 2


def as_scale(scale, spatial_dims: int) -> list[int]:
    """Per-axis integer scale factors (an int or a sequence of length ``spatial_dims``).

    A 3-axis scale given to a 2D (2.5D) network keeps its in-plane part; the slab model's z
    factor becomes its number of output slices. Non-integer ratios are not supported: resample
    the data to an integer-ratio grid first (`bone3d.data.simulate.hr_grid_for`).
    """
    s = [scale] * spatial_dims if isinstance(scale, int) else list(scale)
    if len(s) == 3 and spatial_dims == 2:
        s = s[:2]
    if len(s) != spatial_dims or any(int(v) != v or v < 1 for v in s):
        raise ValueError(f"scale must be {spatial_dims} positive integers, got {scale!r}")
    return [int(v) for v in s]


def scale_stages(scale: Sequence[int]) -> list[list[int]]:
    """Split per-axis scales into stages of prime factors (x4 -> two x2 stages, as EDSR/RCAN)."""
    factors = []
    for s in scale:
        f, n, p = [], int(s), 2
        while n > 1:
            while n % p == 0:
                f.append(p)
                n //= p
            p += 1
        factors.append(f)
    n_stages = max((len(f) for f in factors), default=0)
    return [[f[i] if i < len(f) else 1 for f in factors] for i in range(n_stages)]


def pixel_shuffle(x: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """N-D sub-pixel shuffle with per-axis factors: (B, C*prod(f), *S) -> (B, C, *(S*f)).

    For 2D with equal factors this is exactly ``torch.nn.PixelShuffle``'s ordering.
    """
    b = x.shape[0]
    c = x.shape[1]
    spatial = x.shape[2:]
    d = len(factors)
    prod = 1
    for f in factors:
        prod *= f
    cout = c // prod
    x = x.reshape([b, cout] + factors + list(spatial))
    # (b, c, f1..fd, s1..sd) -> (b, c, s1, f1, s2, f2, ...)
    perm = [0, 1]
    for i in range(d):
        perm.append(2 + d + i)
        perm.append(2 + i)
    x = x.permute(perm)
    out_shape = [b, cout]
    for i in range(d):
        out_shape.append(spatial[i] * factors[i])
    return x.reshape(out_shape)


class PixelShuffleUp(nn.Module):
    """Sub-pixel upsampling stages: conv(C -> C*prod(f)) + per-axis shuffle, one per stage."""

    def __init__(
        self, spatial_dims: int, ch: int, scale: Sequence[int], k: int = 3, act: bool = False
    ):
        super().__init__()
        self.stages = scale_stages(scale)
        self.convs = nn.ModuleList()
        for f in self.stages:
            n = 1
            for v in f:
                n *= v
            self.convs.append(conv(spatial_dims, ch, ch * n, k))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        for c in self.convs:
            x = pixel_shuffle(c(x), self.stages[i])
            if self.act:
                x = F.leaky_relu(x, 0.2)
            i += 1
        return x


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (RCAN's CA layer, Hu et al. 2018)."""

    def __init__(self, spatial_dims: int, ch: int, reduction: int = 16, slope: float = 0.0):
        super().__init__()
        self.down = conv(spatial_dims, ch, max(1, ch // reduction), 1)
        self.up = conv(spatial_dims, max(1, ch // reduction), ch, 1)
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [i for i in range(2, x.dim())]
        y = x.mean(dim=dims, keepdim=True)
        y = self.down(y)
        y = F.leaky_relu(y, self.slope) if self.slope > 0 else F.relu(y)
        return x * torch.sigmoid(self.up(y))


class ResnetBlock(nn.Module):
    """pix2pixHD/CycleGAN residual block: [pad, conv3, norm, ReLU, pad, conv3, norm] + x."""

    def __init__(
        self,
        spatial_dims: int,
        ch: int,
        norm_kind: str = "instance",
        bias: bool = True,
        reflect: bool = True,
    ):
        super().__init__()
        d = spatial_dims
        pad = 0 if reflect else 1
        layers: list[nn.Module] = []
        for i in range(2):
            if reflect:
                layers.append(ReflectPad(d, 1))
            layers += [conv(d, ch, ch, 3, padding=pad, bias=bias), norm(d, norm_kind, ch)]
            if i == 0:
                layers.append(nn.ReLU(True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def interpolate(x: torch.Tensor, scale: list[int], mode: str = "nearest") -> torch.Tensor:
    """Upsample by per-axis integer factors ('nearest', or 'linear' = bi/trilinear)."""
    size = [int(x.shape[2 + i]) * scale[i] for i in range(len(scale))]
    if mode == "linear":
        m = "bilinear" if len(scale) == 2 else "trilinear"
        return F.interpolate(x, size=size, mode=m, align_corners=False)
    return F.interpolate(x, size=size, mode="nearest")
