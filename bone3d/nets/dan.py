"""DAN (Luo et al., NeurIPS 2020, "Unfolding the alternating optimization for blind super
resolution"), DANv1: a restorer conditioned on a 10-dimensional kernel code and an estimator
that predicts the code from the current SR result and the LR input; the two alternate for
``loops`` iterations (`DAN`).

As in greatlog/DAN ``dan_arch.py``: conditional residual blocks (CRB: concat features with the
code map, conv(nf+p -> nf+p), LeakyReLU 0.2, conv(-> nf), channel attention with LeakyReLU,
residual), restorer head/fusion convs and sub-pixel upsampling (x4 as two x2 stages); the
estimator's HR head is a 9-wide convolution with stride = scale, its body CRBs over (LR, HR)
features, a 3x3 conv to the code length and global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from bone3d.nets.blocks import ChannelAttention, PixelShuffleUp, as_scale, conv


class CRB(nn.Module):
    def __init__(self, d: int, nf1: int, nf2: int):
        super().__init__()
        self.body = nn.Sequential(
            conv(d, nf1 + nf2, nf1 + nf2, 3),
            nn.LeakyReLU(0.2, True),
            conv(d, nf1 + nf2, nf1, 3),
            ChannelAttention(d, nf1, 16, slope=0.2),
        )

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return f1 + self.body(torch.cat([f1, f2], 1))


class DANRestorer(nn.Module):
    """``forward(lr, code)``: lr (B, C, *S), code (B, para) -> SR (B, C_out, *(S * scale))."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        scale=4,
        nf: int = 64,
        nb: int = 40,
        input_para: int = 10,
    ):
        super().__init__()
        d = spatial_dims
        self.head = conv(d, in_channels, nf, 3)
        self.body = nn.ModuleList([CRB(d, nf, input_para) for _ in range(nb)])
        self.fusion = conv(d, nf, nf, 3)
        self.up = PixelShuffleUp(d, nf, as_scale(scale, d))
        self.out = conv(d, nf, out_channels, 3)
        self.spatial_dims = spatial_dims
        self.input_para = input_para

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        shape = [code.shape[0], code.shape[1]] + [1] * self.spatial_dims
        cmap = code.reshape(shape).expand([code.shape[0], code.shape[1]] + list(x.shape[2:]))
        f = self.head(x)
        for block in self.body:
            f = block(f, cmap)
        return self.out(self.up(self.fusion(f)))


class DANEstimator(nn.Module):
    """``forward(sr, lr)`` -> kernel code (B, para). ``sr`` has ``sr_channels`` channels
    (default ``in_channels``)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        scale=4,
        nf: int = 64,
        num_blocks: int = 5,
        input_para: int = 10,
        sr_channels: int | None = None,
    ):
        super().__init__()
        d = spatial_dims
        sc = as_scale(scale, d)
        sr_ch = in_channels if sr_channels is None else sr_channels  # 2.5D: s HR slices
        self.head_lr = conv(d, in_channels, nf // 2, 1, padding=0)
        self.head_hr = conv(d, sr_ch, nf // 2, 9, stride=tuple(sc), padding=4)
        self.body = nn.ModuleList([CRB(d, nf // 2, nf // 2) for _ in range(num_blocks)])
        self.out = conv(d, nf // 2, input_para, 3)

    def forward(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        f_lr = self.head_lr(lr)
        f_hr = self.head_hr(sr)
        f = f_lr
        for block in self.body:
            f = block(f, f_hr)
        f = self.out(f)
        dims = [i for i in range(2, f.dim())]
        return f.mean(dim=dims)


class DAN(nn.Module):
    """The alternating unfolded network: returns the SR after ``loops`` iterations, and with
    ``all_loops`` every iteration's SR and kernel code (for losses on each loop)."""

    def __init__(self, restorer: DANRestorer, estimator: DANEstimator, loops: int = 4):
        super().__init__()
        self.restorer = restorer
        self.estimator = estimator
        self.loops = loops
        self.register_buffer("init_code", torch.zeros(1, restorer.input_para))

    def forward_all(self, lr: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        code = self.init_code.expand(lr.shape[0], -1)
        srs: list[torch.Tensor] = []
        codes: list[torch.Tensor] = []
        for _ in range(self.loops):
            sr = self.restorer(lr, code.detach())
            code = self.estimator(sr.detach(), lr)
            srs.append(sr)
            codes.append(code)
        return srs, codes

    def forward(self, lr: torch.Tensor, all_loops: bool = False) -> torch.Tensor:
        """The last loop's SR; with ``all_loops`` (eager mode, training) `forward_all`'s lists,
        so that a ``DistributedDataParallel`` wrapper runs the forward the losses need."""
        if not torch.jit.is_scripting():
            if all_loops:
                return self.forward_all(lr)  # type: ignore[return-value]
        srs, _ = self.forward_all(lr)
        return srs[-1]


class DANSR(DAN):
    """`DAN` built from sizes, as the registry and bundles build networks: a restorer
    (``nf``, ``nb``) and an estimator (``est_nf``, ``est_blocks``) sharing ``input_para`` and
    ``scale``, unfolded ``loops`` times. ``forward(lr)`` is the last loop's SR;
    ``forward_all(lr)`` every loop's SR and kernel code (the training step's losses)."""

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, scale=4,
        nf: int = 64, nb: int = 40, input_para: int = 10, est_nf: int = 64, est_blocks: int = 5,
        loops: int = 4,
    ):  # fmt: skip
        super().__init__(
            DANRestorer(spatial_dims, in_channels, out_channels, scale, nf, nb, input_para),
            DANEstimator(
                spatial_dims, in_channels, scale, est_nf, est_blocks, input_para, out_channels
            ),
            loops,
        )


PRESETS_R = {
    "paper": {"nf": 64, "nb": 40, "input_para": 10},
    "cpu3d": {"nf": 24, "nb": 6, "input_para": 10},
    "tiny": {"nf": 8, "nb": 2, "input_para": 4},
}
PRESETS_E = {
    "paper": {"nf": 64, "num_blocks": 5, "input_para": 10},
    "cpu3d": {"nf": 24, "num_blocks": 3, "input_para": 10},
    "tiny": {"nf": 8, "num_blocks": 1, "input_para": 4},
}
# bone3d's kernel code has 4 entries (`bone3d.data.simulate.kernel_code`); ``paper`` keeps the
# published 10 (a PCA of 21x21 kernels) for its parameter count: set ``input_para=4`` to train it
PRESETS = {
    "paper": {"nf": 64, "nb": 40, "input_para": 10, "est_nf": 64, "est_blocks": 5, "loops": 4},
    "cpu3d": {"nf": 24, "nb": 6, "input_para": 4, "est_nf": 24, "est_blocks": 3, "loops": 4},
    "tiny": {"nf": 8, "nb": 2, "input_para": 4, "est_nf": 8, "est_blocks": 1, "loops": 2},
}
