"""Global thresholds that turn a grey-level bone image into a binary bone mask.

* ``isodata``: Ridler & Calvard (1978) iterative intersection of means, as implemented by
  scikit-image's ``threshold_isodata`` (the level t with t = (mean below t + mean above t) / 2);
* ``otsu``: Otsu (1979) between-class variance maximum (scikit-image ``threshold_otsu``);
* a number: a fixed threshold in the image's own units.

Bone is ``value > threshold`` (ImageJ and BoneJ count the level itself as background for bright
objects with "IsoData"'s default; we use the strict inequality everywhere).
"""

from __future__ import annotations

import numpy as np
from skimage import filters

from bone3d.errors import InputError

METHODS = ("isodata", "otsu")


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
    if np.ptp(values) == 0:
        raise InputError("image", "constant image: no threshold separates bone from marrow")
    if method == "isodata":
        return float(filters.threshold_isodata(values.astype(np.float64)))
    if method == "otsu":
        return float(filters.threshold_otsu(values.astype(np.float64)))
    raise InputError("threshold", f"unknown method {method!r}; use {METHODS} or a number")


def segment(array, method: str | float = "isodata", *, mask=None) -> tuple[np.ndarray, float]:
    """Binary bone mask (``array > t``) and the threshold ``t`` used."""
    t = threshold_value(array, method, mask=mask)
    return np.asarray(array) > t, t
