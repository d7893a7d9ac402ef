"""Whole-volume super-resolution inference."""

from bone3d.inference.sr import VolumePredictor, read_meta

__all__ = ["VolumePredictor", "read_meta"]
