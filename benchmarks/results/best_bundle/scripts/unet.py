"""U-Net for super-resolution on a pre-upsampled LR input.

The murine femur/spine micro-CT study (20 -> 10 um) trained a U-Net (Ronneberger et al. 2015) on
LR volumes interpolated to the HR grid. Here the U-Net is MONAI's ``BasicUNet`` (two 3x3(x3)
convolutions per level, max-pool down, transposed-conv up, skip concatenation), built for 2 or 3
spatial dimensions, with a global residual: ``y = x_centre + UNet(x)``, so the network learns the
missing detail rather than the whole image. For 2.5D input (a slab of 2k+1 slices as channels) the
residual adds the centre channel.

Input ``(B, C_in, *spatial)`` on the HR grid (spatial sizes divisible by 16), output
``(B, C_out, *spatial)``, both normalised to [0, 1].
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

PRESETS = {
    # U-Net of the paper (Ronneberger et al. 2015): 64-128-256-512-1024 features
    "paper": {"features": (64, 64, 128, 256, 512, 64)},
    # capped widths for 64^3 patches on 2 CPU cores
    "cpu3d": {"features": (16, 16, 32, 64, 128, 16)},
    # < 100 k parameters for tests on 16^3 patches
    # one-group GroupNorm: the 16^3 test patches reach a single voxel at the bottleneck
    "tiny": {"features": (4, 4, 8, 8, 16, 4), "norm": ("group", {"num_groups": 1})},
}


class UNetSR(nn.Module):
    """Residual U-Net on the HR grid. ``spatial_dims`` is 2 or 3."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        features: tuple[int, ...] = PRESETS["cpu3d"]["features"],
        norm: str | tuple = ("instance", {"affine": True}),
        residual: bool = True,
    ):
        super().__init__()
        self.unet = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            norm=norm,
        )
        self.residual = residual
        self.centre = in_channels // 2
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unet(x)
        if self.residual:
            y = y + x[:, self.centre : self.centre + 1]
        return y
