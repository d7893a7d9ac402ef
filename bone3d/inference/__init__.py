"""Whole-volume super-resolution inference."""

from bone3d.inference.slab import SlabInferer
from bone3d.inference.sr import VolumePredictor, read_meta

__all__ = ["SlabInferer", "VolumePredictor", "read_meta"]
