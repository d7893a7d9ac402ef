"""Image metrics on whole volumes: PSNR and SSIM in 3D and slice by slice, inside a region.

Both come from MONAI (`monai.metrics.PSNRMetric`; SSIM maps from
`monai.metrics.regression.compute_ssim_and_cs`, Wang et al. 2004: Gaussian window of 11 voxels,
sigma 1.5, K1 = 0.01, K2 = 0.03). Conventions, stated in every result:

* ``data_range`` (the L of PSNR = 10 log10(L^2 / MSE) and of SSIM's constants) is given by the
  caller, normally the HR intensity window of the dataset (``hr_range`` in ``datalist.json``);
  metrics computed with different ranges are not comparable, so it is always reported.
* Inside a region (a VOI mask or the cancellous compartment), PSNR uses the MSE over the
  region's voxels, and SSIM is the mean of the SSIM map over region voxels whose whole window
  lies inside the image (MONAI computes the map with a 'valid' convolution).
* Slice-wise metrics are 2D metrics of each slice normal to an axis (axial = the third array
  axis), over slices with at least 50 % of their pixels in the region; mean, SD and count.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

from bone3d.errors import InputError

WIN = 11
SIGMA = 1.5
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def slices_2p5d(vol: np.ndarray, every: int):
    """Every ``every``-th slice along each of the three axes (the 2.5D sample of a volume)."""
    for axis in range(3):
        for k in range(every // 2, vol.shape[axis], every):
            yield np.take(vol, k, axis=axis)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float, region=None) -> float:
    """PSNR in dB over ``region`` (all voxels when None), MONAI's formula."""
    from monai.metrics import PSNRMetric

    if region is None:
        return float(PSNRMetric(max_val=data_range)(_t(pred), _t(ref)).item())
    r = np.asarray(region, bool)
    # MONAI's PSNRMetric averages over every voxel; over a region, feed it the region's voxels
    return float(PSNRMetric(max_val=data_range)(_t(pred[r][None]), _t(ref[r][None])).item())


def ssim_map(pred: np.ndarray, ref: np.ndarray, data_range: float) -> tuple[np.ndarray, int]:
    """MONAI's SSIM map (valid part) and the border it lost on each side (voxels)."""
    dims = pred.ndim
    win = min(WIN, *[s if s % 2 else s - 1 for s in pred.shape])
    if win < 3:
        raise InputError("image", f"too small for SSIM: shape {pred.shape}")
    smap, _ = compute_ssim_and_cs(
        _t(pred),
        _t(ref),
        spatial_dims=dims,
        kernel_size=[win] * dims,
        kernel_sigma=[SIGMA] * dims,
        data_range=float(data_range),
        kernel_type="gaussian",
        k1=0.01,
        k2=0.03,
    )
    return smap[0, 0].numpy(), win // 2


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float, region=None) -> float:
    smap, b = ssim_map(pred, ref, data_range)
    if region is None:
        return float(smap.mean())
    inner = tuple(slice(b, s - b) for s in pred.shape)
    r = np.asarray(region, bool)[inner]
    if not r.any():
        return float("nan")
    return float(smap[r].mean())


def _summary(values: list[float]) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "n": int(v.size),
        "values": v.tolist(),
    }


def slice_metrics(pred, ref, data_range: float, region=None, axis: int = 2) -> dict:
    """PSNR and SSIM of each 2D slice normal to ``axis``; mean, SD, n and the values."""
    ps, ss = [], []
    for k in range(pred.shape[axis]):
        p, r = np.take(pred, k, axis=axis), np.take(ref, k, axis=axis)
        reg = None if region is None else np.take(np.asarray(region, bool), k, axis=axis)
        if reg is not None and reg.mean() < 0.5:
            continue
        if np.array_equal(p, r):
            ps.append(float("inf"))
        else:
            ps.append(psnr(p, r, data_range, reg))
        ss.append(ssim(p, r, data_range, reg))
    return {"psnr_db": _summary(ps), "ssim": _summary(ss)}


def image_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    data_range: float,
    *,
    region: np.ndarray | None = None,
    cancellous: np.ndarray | None = None,
    slice_axes: tuple[str, ...] = ("axial",),
) -> dict:
    """PSNR/SSIM of ``pred`` against ``ref`` (same grid): 3D and slice-wise, in the region and,
    when given, in the cancellous compartment alone.

    Args:
        pred, ref: 3D arrays on one grid, in the same intensity units.
        data_range: L of PSNR/SSIM (the HR window width).
        region: boolean VOI (whole image when None).
        cancellous: boolean cancellous-bone region (trabecular compartment incl. marrow).
        slice_axes: any of "axial", "coronal", "sagittal".
    """
    pred = np.asarray(pred, np.float32)
    ref = np.asarray(ref, np.float32)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise InputError("pred", f"shape {pred.shape} does not match the reference {ref.shape}")
    if not np.isfinite(pred).all():
        raise InputError("pred", "NaN or infinite voxels")
    if not data_range or data_range <= 0:
        raise InputError("data_range", f"must be positive, got {data_range}")
    regions = {"voi": region}
    if cancellous is not None:
        c = np.asarray(cancellous, bool) & (True if region is None else np.asarray(region, bool))
        if not c.any():
            raise InputError("cancellous", "empty cancellous region")
        regions["cancellous"] = c
    out: dict = {
        "data_range": float(data_range),
        "conventions": "MONAI PSNR/SSIM (Gaussian 11, sigma 1.5, K1 0.01, K2 0.03); region "
        "PSNR = MSE over region voxels; region SSIM = mean SSIM map over region voxels",
    }
    for name, reg in regions.items():
        if reg is not None and not np.asarray(reg, bool).any():
            raise InputError(name, "empty region")
        block = {
            "psnr_db": psnr(pred, ref, data_range, reg),
            "ssim": ssim(pred, ref, data_range, reg),
        }
        for ax in slice_axes:
            if ax not in AXES:
                raise InputError("slice_axes", f"unknown axis {ax!r}; choose from {list(AXES)}")
            block[f"slices_{ax}"] = slice_metrics(pred, ref, data_range, reg, AXES[ax])
        out[name] = block
    return out
