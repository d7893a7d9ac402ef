"""A perceptual loss from a feature extractor trained in-project on micro-CT.

ESRGAN, pix2pixHD and SRGAN compare generated and real images in the feature space of an
ImageNet VGG-19. Those weights cannot be downloaded here, and natural-image features are not
bone's. bone3d uses the convolutional features of its frozen morphometry regressor
(`bone3d.losses.regressor.MorphometryRegressor`, ``bone3d fit-regressor``). It was trained on HR
micro-CT patches and degraded copies to predict BV/TV, Tb.Th, Tb.Sp (and Conn.D in 3D), so its
features respond to what morphometry measures.

The loss follows ESRGAN (Wang et al. 2018, sec. 3.3): L1 between the features of the prediction
and of the target, here summed over the regressor's blocks with equal weights (``layers``) rather
than one deep layer, so that fine and coarse structure both count. The regressor's blocks end in
instance norm and LeakyReLU: features after activation, where ESRGAN takes VGG's before it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from bone3d.losses.regressor import MorphometryRegressor, frozen_regressor


class PerceptualLoss(nn.Module):
    """``sum_l mean |F_l(pred) - F_l(target)|`` over the chosen blocks ``layers`` (default:
    all) of a frozen `MorphometryRegressor` given as a module or a ``bone3d fit-regressor``
    file. Channels are separate images (2.5D outputs); inputs are in the network's [0, 1] window,
    as the regressor was trained. Returns a scalar; gradients flow to ``pred`` only."""

    def __init__(
        self,
        regressor: MorphometryRegressor | str | os.PathLike,
        layers: list[int] | None = None,
    ):
        super().__init__()
        self.regressor = frozen_regressor(regressor)
        n = len(self.regressor.features)
        self.layers = list(range(n)) if layers is None else [int(i) for i in layers]
        if not self.layers or any(not 0 <= i < n for i in self.layers):
            raise ValueError(f"layers must be indices of the regressor's {n} blocks")

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, block in enumerate(self.regressor.features):
            x = block(x)
            if i in self.layers:
                out.append(x)
            if i >= max(self.layers):
                break
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dims = self.regressor.spatial_dims
        if pred.ndim - 2 != dims or pred.shape != target.shape:
            raise ValueError(
                f"a {dims}D feature extractor compares two equal (B, C, {dims} axes) tensors, "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        self.regressor.to(pred.device)
        x = pred.reshape(-1, 1, *pred.shape[2:])
        with torch.no_grad():
            ref = self._features(target.reshape(-1, 1, *target.shape[2:]))
        return sum((f - r).abs().mean() for f, r in zip(self._features(x), ref, strict=True))
