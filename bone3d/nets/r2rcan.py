"""R2-RCAN, the generator of R2-RCANGAN (rat tibia micro-CT x8 study): RCAN residual groups
alternating with Res2Net groups, long skip, sub-pixel reconstruction.

* RCAN group: RCABs (conv-ReLU-conv + channel attention) and a conv, with a skip (Zhang 2018).
* Res2 group: Res2 blocks and a conv, with a skip. A Res2 block (Gao et al., TPAMI 2021): 1x1
  conv to ``scales`` chunks of ``width`` channels; chunk 1 passes, chunk i gets
  ``K_i(x_i + y_{i-1})`` (3x3 conv + ReLU), giving multi-scale receptive fields; concatenation, 1x1
  conv back, squeeze-excitation, residual.

Paper: 10 RCAB groups x 20 RCABs and 10 Res2 groups x 5 Res2 blocks, alternating, 64 features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bone3d.nets.blocks import ChannelAttention, PixelShuffleUp, as_scale, conv
from bone3d.nets.rcan import ResidualGroup


class Res2Block(nn.Module):
    def __init__(self, d: int, nf: int, width: int = 16, scales: int = 4, reduction: int = 16):
        super().__init__()
        self.width = width
        self.scales = scales
        self.reduce = conv(d, nf, width * scales, 1, padding=0)
        self.convs = nn.ModuleList([conv(d, width, width, 3) for _ in range(scales - 1)])
        self.expand = conv(d, width * scales, nf, 1, padding=0)
        self.se = ChannelAttention(d, nf, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(F.relu(self.reduce(x)), self.width, dim=1)
        outs = [chunks[0]]
        y = chunks[0]
        i = 1
        for c in self.convs:
            y = F.relu(c(chunks[i] + y if i > 1 else chunks[i]))
            outs.append(y)
            i += 1
        return x + self.se(self.expand(torch.cat(outs, 1)))


class Res2Group(nn.Module):
    def __init__(self, d: int, nf: int, n_blocks: int, width: int, scales: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(
            *[Res2Block(d, nf, width, scales, reduction) for _ in range(n_blocks)],
            conv(d, nf, nf, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class R2RCAN(nn.Module):
    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, scale=8,
        n_groups: int = 10, n_rcab: int = 20, n_res2: int = 5, n_feats: int = 64,
        res2_width: int = 16, res2_scales: int = 4, reduction: int = 16,
    ):  # fmt: skip
        super().__init__()
        d = spatial_dims
        self.head = conv(d, in_channels, n_feats, 3)
        body: list[nn.Module] = []
        for _ in range(n_groups):
            body.append(ResidualGroup(d, n_feats, n_rcab, reduction))
            body.append(Res2Group(d, n_feats, n_res2, res2_width, res2_scales, reduction))
        body.append(conv(d, n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        self.up = PixelShuffleUp(d, n_feats, as_scale(scale, d))
        self.tail = conv(d, n_feats, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.up(h + self.body(h)))


PRESETS = {
    "paper": {
        "n_groups": 10,
        "n_rcab": 20,
        "n_res2": 5,
        "n_feats": 64,
        "res2_width": 16,
        "res2_scales": 4,
        "reduction": 16,
    },
    "cpu3d": {
        "n_groups": 2,
        "n_rcab": 3,
        "n_res2": 2,
        "n_feats": 32,
        "res2_width": 8,
        "res2_scales": 4,
        "reduction": 8,
    },
    "tiny": {
        "n_groups": 1,
        "n_rcab": 1,
        "n_res2": 1,
        "n_feats": 8,
        "res2_width": 2,
        "res2_scales": 4,
        "reduction": 4,
    },
}
