"""Bone morphometry: segmentation thresholds, volumes of interest and metrics in physical units."""

from bone3d.morphometry.metrics import ALL_METRICS, FIELDS, bone_volume_fraction, morphometry
from bone3d.morphometry.thresholds import segment, threshold_value

__all__ = [
    "ALL_METRICS",
    "FIELDS",
    "bone_volume_fraction",
    "morphometry",
    "segment",
    "threshold_value",
]
