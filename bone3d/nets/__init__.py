"""Network registry: names -> classes and presets. Every network takes ``spatial_dims`` first."""

from __future__ import annotations

from torch import nn

from bone3d.errors import InputError
from bone3d.nets import unet

REGISTRY: dict[str, tuple[type[nn.Module], dict[str, dict]]] = {
    "unet": (unet.UNetSR, unet.PRESETS),
}


def build(name: str, spatial_dims: int = 3, preset: str = "cpu3d", **kwargs) -> nn.Module:
    """Build registry network ``name`` with ``preset`` widths; ``kwargs`` override the preset."""
    if name not in REGISTRY:
        raise InputError("network", f"unknown network {name!r}; choose from {sorted(REGISTRY)}")
    cls, presets = REGISTRY[name]
    if preset not in presets:
        raise InputError(
            "preset", f"{name} has no preset {preset!r}; choose from {sorted(presets)}"
        )
    if spatial_dims not in (2, 3):
        raise InputError("spatial_dims", f"must be 2 or 3, got {spatial_dims}")
    return cls(spatial_dims=spatial_dims, **{**presets[preset], **kwargs})
