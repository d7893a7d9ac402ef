"""Volumes of interest: the whole image, a mask image, or a cylinder in millimetres.

Rasterisation rule: a voxel belongs to a VOI when its **centre** lies inside (on the boundary
counts as inside). Positions are in mm in the array frame: voxel (i, j, k) has its centre at
``(i * sx, j * sy, k * sz)``; the cylinder's centre defaults to the centre of the array.

The vertebral studies place two cylinders of 15 mm diameter x 5 mm height per vertebral body
along the cranio-caudal (z) axis; ``cylinder(shape, spacing, 15, 5, centre_mm=..., axis="z")``.
"""

from __future__ import annotations

import numpy as np

from bone3d.errors import InputError

AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


def whole(shape) -> np.ndarray:
    return np.ones(tuple(shape), dtype=bool)


def cylinder(
    shape,
    spacing,
    diameter_mm: float,
    height_mm: float,
    *,
    centre_mm=None,
    axis="z",
) -> np.ndarray:
    """Boolean cylinder VOI (voxel-centre rule).

    Args:
        shape: array shape (X, Y, Z).
        spacing: voxel size (mm) per axis; anisotropic spacing is handled exactly.
        diameter_mm, height_mm: cylinder size.
        centre_mm: centre in mm in the array frame (default: array centre).
        axis: "x", "y", "z" or a 3-vector (normalised here).

    Raises:
        InputError: non-positive sizes, or a cylinder that contains no voxel centre.
    """
    if diameter_mm <= 0 or height_mm <= 0:
        raise InputError(
            "cylinder", f"diameter and height must be positive, got {diameter_mm}, {height_mm}"
        )
    sp = np.asarray(spacing, dtype=float)
    shape = tuple(int(s) for s in shape)
    if centre_mm is None:
        centre = (np.asarray(shape) - 1) * sp / 2.0
    else:
        centre = np.asarray(centre_mm, dtype=float)
    u = np.asarray(AXES[axis] if isinstance(axis, str) else axis, dtype=float)
    if u.shape != (3,) or not np.linalg.norm(u) > 0:
        raise InputError("cylinder", f"axis must be x, y, z or a non-zero 3-vector, got {axis!r}")
    u = u / np.linalg.norm(u)
    grids = np.meshgrid(
        *[np.arange(n) * s - c for n, s, c in zip(shape, sp, centre, strict=True)], indexing="ij"
    )
    along = grids[0] * u[0] + grids[1] * u[1] + grids[2] * u[2]
    radial2 = grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2 - along**2
    voi = (np.abs(along) <= height_mm / 2.0 + 1e-9) & (radial2 <= (diameter_mm / 2.0) ** 2 + 1e-9)
    if not voi.any():
        raise InputError("cylinder", "the cylinder contains no voxel centre (outside the image?)")
    return voi


def from_mask(mask, shape) -> np.ndarray:
    """Validate a mask image as a VOI: same shape, binary (0/1 or 0/255), not empty."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise InputError("mask", f"shape {m.shape} differs from the image {tuple(shape)}")
    values = np.unique(m)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        raise InputError("mask", f"mask is not binary (values {values[:5].tolist()}...)")
    voi = m > 0
    if not voi.any():
        raise InputError("mask", "empty mask")
    return voi
