"""Bone morphometry: segmentation thresholds, volumes of interest and metrics in physical units."""

from bone3d.morphometry.metrics import bone_volume_fraction
from bone3d.morphometry.thresholds import segment, threshold_value

__all__ = ["bone_volume_fraction", "segment", "threshold_value"]
