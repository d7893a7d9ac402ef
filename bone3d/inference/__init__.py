"""Whole-volume super-resolution inference."""

from bone3d.inference.ensemble import FlipEnsemble
from bone3d.inference.slab import SlabInferer
from bone3d.inference.sr import VolumePredictor, read_meta

__all__ = ["FlipEnsemble", "SlabInferer", "VolumePredictor", "read_meta"]
