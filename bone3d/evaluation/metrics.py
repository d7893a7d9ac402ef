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


class MorphometryPanel:
    """Morphometry of (prediction, target) volume pairs, computed once and shared by the
    validation metrics `MorphometryRelError` makes (one per parameter).

    Each volume is segmented with its own global threshold (``method``, ImageJ IsoData by
    default) and measured by `bone3d.morphometry.metrics.morphometry` with ``spacing`` in mm
    (BoneJ conventions: Tb.Th / Tb.Sp local thickness, Hildebrand & Rueegsegger 1997; Conn.D =
    (1 - delta chi) / TV, Odgaard & Gundersen 1993). The last pair is cached by identity and
    content, so several metric handlers on one validation volume cost one measurement.
    """

    PARAMETERS = ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3")

    def __init__(self, method: str = "isodata", spacing=(1.0, 1.0, 1.0)):
        self.method = method
        self.spacing = tuple(float(s) for s in spacing)
        self._key = None
        self._value = None

    def measure(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[dict, dict]:
        from bone3d.morphometry.metrics import morphometry

        key = (
            pred.data_ptr(),
            target.data_ptr(),
            tuple(pred.shape),
            float(pred.sum()),
            float(target.sum()),
        )
        if key != self._key:
            out = []
            for vol in (pred, target):
                bone, _ = segment(vol[0].detach().cpu().float().numpy(), self.method)
                out.append(
                    morphometry(
                        bone, self.spacing, metrics=("bv_tv", "tb_th", "tb_sp", "connectivity")
                    )
                )
            self._key, self._value = key, tuple(out)
        return self._value

    def error(self, parameter: str) -> MorphometryRelError:
        return MorphometryRelError(self, parameter)


class MorphometryRelError(CumulativeIterationMetric):
    """|X(pred) - X(target)| / |X(target)| per volume for one morphometric parameter X of
    `MorphometryPanel.PARAMETERS`; NaN where the target's value is 0 or undefined, left out of
    the mean."""

    def __init__(self, panel: MorphometryPanel, parameter: str):
        super().__init__()
        if parameter not in MorphometryPanel.PARAMETERS:
            raise ValueError(f"parameter must be one of {MorphometryPanel.PARAMETERS}")
        self.panel = panel
        self.parameter = parameter

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):
        errs = []
        for p, t in zip(y_pred, y, strict=True):
            mp, mt = self.panel.measure(p, t)
            a, b = mp.get(self.parameter), mt.get(self.parameter)
            ok = a is not None and b is not None and b != 0
            errs.append(abs(a - b) / abs(b) if ok else float("nan"))
        return torch.tensor(errs, dtype=torch.float32)[:, None]

    def aggregate(self):
        return torch.nanmean(self.get_buffer())
