"""Geometric self-ensemble at inference: the network's output averaged over mirrored inputs.

``FlipEnsemble(net)(x)`` is the mean of ``flip_A(net(flip_A(x)))`` over every subset A of the
spatial axes of ``x`` (``(B, C, *spatial)``, 2 or 3 spatial dims): 4 passes for a 2D or 2.5D
network, 8 for a 3D one. It is the "+" self-ensemble of EDSR+ / RCAN+ (Lim et al. 2017, Zhang
et al. 2018), after Timofte et al. 2016 ("Seven ways to improve example-based single image super
resolution"): a trained network is not exactly equivariant, and its mirrored predictions
disagree most on what it invents (noise-driven specks, broken rods), so their mean keeps the
structure they share. Mirrors only, no 90-degree rotations: a mirror maps an anisotropic LR grid
(MDCT slices thicker along z) and a 2.5D slab onto themselves, a rotation does not. The output
grid is unchanged, so sliding-window blending and streaming work on the wrapped network as on
the plain one.

MONAI's ``TestTimeAugmentation`` draws random invertible transforms on whole images to estimate
uncertainty; this is the deterministic mirror average of the SR literature, wrapped around the
network so every inferer uses it, hence hand-written. This file imports only torch:
``bone3d export`` copies it into exported bundles.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


class FlipEnsemble(nn.Module):
    """Mean of the network's outputs over the ``2^n`` mirror images of its input.

    Args:
        network: maps ``(B, C, *spatial)`` to ``(B, C', *spatial')`` whose spatial axes are
            those of the input (possibly up-sampled), as every SR network here does.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.ndim - 2
        if n not in (2, 3):
            raise ValueError(f"expected (B, C, *spatial) with 2 or 3 spatial dims, got {x.shape}")
        axes = range(2, 2 + n)
        total, count = None, 0
        for k in range(n + 1):
            for dims in itertools.combinations(axes, k):
                y = self.network(torch.flip(x, dims) if dims else x)
                y = torch.flip(y, dims) if dims else y
                total = y if total is None else total + y
                count += 1
        return total / count
