"""Morphometric metrics in physical units (mm, mm^3).

Nomenclature after Bouxsein et al. 2010 (J Bone Miner Res 25:1468), "Guidelines for assessment of
bone microstructure in rodents using micro-computed tomography".
"""

from __future__ import annotations

import numpy as np

from bone3d.errors import InputError


def bone_volume_fraction(bone, *, voi=None, spacing=(1.0, 1.0, 1.0)) -> dict:
    """BV/TV by voxel counting (Bouxsein et al. 2010): bone voxels / VOI voxels.

    Args:
        bone: binary bone mask, any shape.
        voi: binary volume of interest of the same shape (whole image when None).
        spacing: voxel size in mm, for BV and TV in mm^3.

    Returns:
        ``{"bv_tv", "bv_mm3", "tv_mm3"}``.
    """
    bone = np.asarray(bone, dtype=bool)
    voi = np.ones_like(bone) if voi is None else np.asarray(voi, dtype=bool)
    if voi.shape != bone.shape:
        raise InputError("voi", f"VOI shape {voi.shape} differs from image shape {bone.shape}")
    n_tv = int(voi.sum())
    if n_tv == 0:
        raise InputError("voi", "empty volume of interest")
    n_bv = int((bone & voi).sum())
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=float)))
    return {"bv_tv": n_bv / n_tv, "bv_mm3": n_bv * voxel_mm3, "tv_mm3": n_tv * voxel_mm3}
