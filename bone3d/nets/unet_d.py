"""U-Net discriminator with spectral normalisation (Real-ESRGAN, Wang et al., ICCVW 2021).

As in xinntao/Real-ESRGAN ``UNetDiscriminatorSN``: a plain 3x3 stem, three spectrally normalised
4x4 stride-2 downsampling convolutions, three bi/trilinear x2 upsamplings each followed by a
spectrally normalised 3x3 conv with a skip connection, two more spectrally normalised convs and a
3x3 output: a per-voxel realness map at the input resolution (LeakyReLU 0.2 throughout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from bone3d.nets.blocks import conv, interpolate


class UNetDiscriminatorSN(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_feat: int = 64,
        skip_connection: bool = True,
    ):
        super().__init__()
        d, f = spatial_dims, num_feat
        self.skip = skip_connection
        self.spatial_dims = d
        self.conv0 = conv(d, in_channels, f, 3)
        self.conv1 = spectral_norm(conv(d, f, f * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(conv(d, f * 2, f * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(conv(d, f * 4, f * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(conv(d, f * 8, f * 4, 3, bias=False))
        self.conv5 = spectral_norm(conv(d, f * 4, f * 2, 3, bias=False))
        self.conv6 = spectral_norm(conv(d, f * 2, f, 3, bias=False))
        self.conv7 = spectral_norm(conv(d, f, f, 3, bias=False))
        self.conv8 = spectral_norm(conv(d, f, f, 3, bias=False))
        self.conv9 = conv(d, f, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = [2] * self.spatial_dims
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)
        x2 = F.leaky_relu(self.conv2(x1), 0.2)
        x3 = F.leaky_relu(self.conv3(x2), 0.2)
        x4 = F.leaky_relu(self.conv4(interpolate(x3, up, "linear")), 0.2)
        if self.skip:
            x4 = x4 + x2
        x5 = F.leaky_relu(self.conv5(interpolate(x4, up, "linear")), 0.2)
        if self.skip:
            x5 = x5 + x1
        x6 = F.leaky_relu(self.conv6(interpolate(x5, up, "linear")), 0.2)
        if self.skip:
            x6 = x6 + x0
        out = F.leaky_relu(self.conv7(x6), 0.2)
        out = F.leaky_relu(self.conv8(out), 0.2)
        return self.conv9(out)


PRESETS = {"paper": {"num_feat": 64}, "cpu3d": {"num_feat": 16}, "tiny": {"num_feat": 4}}
