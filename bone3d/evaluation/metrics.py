"""Metrics usable inside MONAI engines (validation during training).

PSNR and SSIM come from MONAI (``PSNRMetric``, ``SSIMMetric``); this module adds the morphometric
error that bone3d cares about.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric

from bone3d.morphometry.metrics import bone_volume_fraction
from bone3d.morphometry.thresholds import segment


class BVTVAbsError(CumulativeIterationMetric):
    """|BV/TV(pred) - BV/TV(target)| per volume, each segmented by its own global threshold.

    ``method`` is the global threshold (``"isodata"`` by default, Ridler & Calvard 1978), applied
    separately to prediction and target, as a researcher would segment each scan. BV/TV is voxel
    counting over the whole volume (Bouxsein et al. 2010).
    """

    def __init__(self, method: str = "isodata"):
        super().__init__()
        self.method = method

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):
        errs = []
        for p, t in zip(y_pred, y, strict=True):
            bp, _ = segment(p[0].detach().cpu().float().numpy(), self.method)
            bt, _ = segment(t[0].detach().cpu().float().numpy(), self.method)
            errs.append(abs(bone_volume_fraction(bp)["bv_tv"] - bone_volume_fraction(bt)["bv_tv"]))
        return torch.tensor(errs, dtype=torch.float32)[:, None]

    def aggregate(self):
        data = self.get_buffer()
        return data.mean()
