"""Slice-wise (2D) and slab (2.5D) inference over whole 3D volumes.

For every slice z along the last axis, the 2D network sees the slab of slices z-k..z+k as
channels (edge slices repeated at the volume ends) and predicts slice z (a post-upsampling model
predicts C channels = the C HR slices of LR slice z, up-sampled in-plane too); each slice is processed
with MONAI's ``SlidingWindowInferer`` (Gaussian blending) in-plane, several slices per batch.
Input ``(B, 1, X, Y, Z)``, output ``(B, 1, X', Y', C Z)`` (the HR grid), like the 3D inferer, so the same
evaluator, metrics and writer serve 2D, 2.5D and 3D models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type


class SlabInferer(Inferer):
    def __init__(
        self,
        roi_size: Sequence[int],
        slab: int = 0,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        slices_per_batch: int = 8,
        mode: str = "gaussian",
    ):
        super().__init__()
        self.slab = int(slab)
        self.halo = max(1, int(slab))  # z context a slab of the stack needs (streaming)
        self.slices_per_batch = int(slices_per_batch)
        self.inner = SlidingWindowInferer(
            roi_size=list(roi_size)[:2], sw_batch_size=sw_batch_size, overlap=overlap, mode=mode
        )

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.dim() != 5:
            raise ValueError(f"expected (B, C, X, Y, Z), got {tuple(inputs.shape)}")
        meta_src = inputs
        if hasattr(inputs, "as_tensor"):  # a MONAI MetaTensor: compute on the plain tensor
            inputs = inputs.as_tensor()
        k = self.slab
        # replicate-pad z so every slice has a full slab (F.pad pads the last dims first)
        padded = F.pad(inputs, (k, k, 0, 0, 0, 0), mode="replicate") if k else inputs
        outs = []
        depth = inputs.shape[-1]
        for b in range(inputs.shape[0]):
            vol = padded[b, 0]  # (X, Y, Z + 2k)
            slices = []
            for z0 in range(0, depth, self.slices_per_batch):
                zs = range(z0, min(depth, z0 + self.slices_per_batch))
                x = torch.stack(
                    [vol[:, :, z : z + 2 * k + 1].permute(2, 0, 1) for z in zs]
                )  # (n, 2k+1, X, Y)
                slices.append(self.inner(x, network, *args, **kwargs))  # (n, 1, X, Y)
            pred = torch.cat(slices, 0)  # (Z, C, X', Y'): C HR slices per LR slice
            z, c = pred.shape[:2]
            outs.append(pred.permute(2, 3, 0, 1).reshape(1, *pred.shape[2:], z * c))
        out = torch.stack(outs)
        # like MONAI's SlidingWindowInferer: a MetaTensor in, a MetaTensor (same affine) out
        return convert_to_dst_type(out, meta_src, dtype=out.dtype)[0]
