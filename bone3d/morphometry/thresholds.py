"""Segmentation: global thresholds and pre-filters that turn a grey-level image into bone.

Methods (bone is ``value > threshold``, the convention of ImageJ's dark-background thresholds):

* ``isodata``: ImageJ's ``AutoThresholder`` "IsoData" (Ridler & Calvard 1978, the iterative
  intermeans variant in ImageJ), computed on a 256-bin histogram as ImageJ does: for 8-bit data
  the bins are the grey values; otherwise 256 equal bins over [min, max], and the level found in
  bin ``g`` maps back to the upper edge of that bin. It returns the same level as ImageJ's
  ``IJ.setAutoThreshold(imp, "IsoData dark")`` on 8-bit images.
* ``otsu``: Otsu (1979), scikit-image ``threshold_otsu`` on the raw values.
* a number: a fixed threshold in the image's units.
* ``density``: a threshold in mg HA/cm^3, turned into image units with a linear calibration
  ``density = slope * value + intercept`` (e.g. 322 mg HA/cm^3 for HR-pQCT trabecular bone).

Optional pre-filters named in the literature: Gaussian blur (sigma in voxels, e.g. 1.2, as in
Scanco's IPL "gauss" before thresholding) and total-variation denoising (Chambolle, scikit-image).

``purify`` (as BoneJ's Purify): keep the largest 26-connected bone particle and fill marrow
cavities not connected (6-connectivity) to the largest marrow phase; reported as such.
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, restoration

from bone3d.errors import InputError

METHODS = ("isodata", "otsu")


def imagej_isodata_level(hist: np.ndarray) -> int:
    """ImageJ AutoThresholder IsoData on a histogram (integer arithmetic as in ImageJ).

    Hand-written because no Python library reproduces ImageJ's variant (integer means, search
    from the first non-empty bin, ``g == round((l + h) / 2)`` stopping rule).
    """
    data = np.asarray(hist, dtype=np.int64)
    n = len(data)
    g = 0
    for i in range(1, n):
        if data[i] > 0:
            g = i + 1
            break
    csum = np.cumsum(data)
    cmom = np.cumsum(data * np.arange(n))
    total, total_m = int(csum[-1]), int(cmom[-1])
    while True:
        totl = int(csum[g]) if g < n else total
        lm = int(cmom[g]) if g < n else total_m
        toth = total - totl
        hm = total_m - lm
        if totl > 0 and toth > 0:
            lmean = lm // totl
            hmean = hm // toth
            if g == int(np.floor((lmean + hmean) / 2.0 + 0.5)):
                return g
        g += 1
        if g > n - 2:
            raise InputError("threshold", "IsoData found no threshold (histogram is degenerate)")


def _isodata(values: np.ndarray) -> float:
    if values.dtype == np.uint8:
        hist = np.bincount(values.ravel(), minlength=256)
        return float(imagej_isodata_level(hist))
    lo, hi = float(values.min()), float(values.max())
    hist, edges = np.histogram(values, bins=256, range=(lo, hi))
    g = imagej_isodata_level(hist)
    return float(edges[g + 1])


def threshold_value(array, method: str | float = "isodata", *, mask=None) -> float:
    """The global threshold of ``array`` (inside ``mask`` if given) by ``method``."""
    if not isinstance(method, str):
        value = float(method)
        if not np.isfinite(value):
            raise InputError("threshold", f"fixed threshold must be finite, got {method!r}")
        return value
    arr = np.asarray(array)
    values = arr[np.asarray(mask, bool)] if mask is not None else arr.ravel()
    if values.size == 0:
        raise InputError("mask", "empty mask: no voxels to threshold")
    if values.min() == values.max():
        raise InputError("image", "constant image: no threshold separates bone from marrow")
    if method == "isodata":
        return _isodata(values)
    if method == "otsu":
        return float(filters.threshold_otsu(values.astype(np.float64)))
    raise InputError("threshold", f"unknown method {method!r}; use {METHODS} or a number")


def density_threshold(density_mgha: float, slope: float, intercept: float) -> float:
    """Image value whose calibrated density ``slope * value + intercept`` is ``density_mgha``."""
    if slope == 0:
        raise InputError("calibration", "slope must not be zero")
    return (float(density_mgha) - float(intercept)) / float(slope)


def prefilter(array, *, gaussian_sigma: float = 0.0, tv_weight: float = 0.0) -> np.ndarray:
    """Gaussian blur (sigma in voxels) and/or total-variation denoising (Chambolle weight)."""
    out = np.asarray(array, dtype=np.float32)
    if gaussian_sigma > 0:
        out = ndi.gaussian_filter(out, gaussian_sigma)
    if tv_weight > 0:
        lo, hi = float(out.min()), float(out.max())
        scale = (hi - lo) or 1.0
        den = restoration.denoise_tv_chambolle((out - lo) / scale, weight=tv_weight)
        out = (den * scale + lo).astype(np.float32)
    return out


def purify(bone: np.ndarray) -> np.ndarray:
    """Largest 26-connected bone particle, with marrow cavities not connected (6) to the
    largest marrow component filled in (BoneJ Purify)."""
    b = np.asarray(bone, dtype=bool)
    if not b.any():
        return b.copy()
    out = cc3d.largest_k(b, k=1, connectivity=26) > 0
    marrow = ~out
    if marrow.any():
        keep = cc3d.largest_k(marrow, k=1, connectivity=6) > 0
        out = out | (marrow & ~keep)
    return out


def segment(array, method: str | float = "isodata", *, mask=None) -> tuple[np.ndarray, float]:
    """Binary bone mask (``array > t``) and the threshold ``t`` used."""
    t = threshold_value(array, method, mask=mask)
    return np.asarray(array) > t, t
