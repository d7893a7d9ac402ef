"""Training losses beyond MONAI's: morphometry-aware terms (`bone3d.losses.morphometry`)."""

from bone3d.losses.morphometry import (
    MorphometryLoss,
    MorphometryWarmup,
    class_means,
    fabric_profile,
    granulometry,
    intercept_density,
    lattice_directions,
    otsu_threshold,
    soft_bone,
    soft_bvtv,
    soft_euler,
    soft_thickness,
)

__all__ = [
    "MorphometryLoss",
    "MorphometryWarmup",
    "class_means",
    "fabric_profile",
    "granulometry",
    "intercept_density",
    "lattice_directions",
    "otsu_threshold",
    "soft_bone",
    "soft_bvtv",
    "soft_euler",
    "soft_thickness",
]
