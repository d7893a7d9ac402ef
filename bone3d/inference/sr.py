"""Sliding-window super-resolution of a whole LR volume into a micro-CT-like stack.

The LR volume is put on the HR grid of its own field of view (`bone3d.data.simulate.hr_grid_for`,
trilinear, for pre-upsampling models), normalised with the training windows, run through MONAI's
``SlidingWindowInferer`` (Gaussian blending of overlapping patches), mapped back to the HR units
and written with the **HR spacing and an affine whose field of view equals the LR's**.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from bone3d.data.patches import pair_transform
from bone3d.errors import InputError
from bone3d.io import read_volume, write_volume


def read_meta(path: str | os.PathLike) -> dict:
    """Read the data windows a model was trained with (``models/data_meta.json``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing: train the bundle first (it writes data_meta.json)")
    meta = json.loads(path.read_text())
    for key in ("lr_range", "hr_range", "hr_spacing_mm"):
        if key not in meta:
            raise InputError(path, f"missing key {key!r}")
    return meta


class VolumePredictor:
    """Predict micro-CT-like volumes from LR volumes.

    Args:
        network: model taking ``(B, 1, *patch)`` in [0, 1] on the HR grid.
        inferer: a MONAI inferer (``SlidingWindowInferer``).
        data_meta: ``lr_range``, ``hr_range`` and ``hr_spacing_mm`` the model was trained with.
        device: torch device.
        pre_upsample: put the LR on the HR grid before the network (U-Net-type models).
        scale: post-upsampling models (EDSR, RCAN, ...): the LR goes on
            `bone3d.data.patches.lr_working_grid` (``scale x`` the HR spacing), the network
            up-samples by ``scale``, and the output lies on the HR grid cut to whole multiples of
            ``scale`` (at most ``scale - 1`` HR voxels fewer per axis than `hr_grid_for`). Such
            outputs are predicted in memory (no streaming).
        stream_voxels: outputs with more voxels than this (default 64 Mi, 256 MB as float32) are
            written slab by slab into a memory-mapped NIfTI (`bone3d.inference.stream`).
        chunk: slices per slab when streaming with a 2D / 2.5D inferer (3D models stream one
            row of windows at a time).
    """

    def __init__(
        self,
        network,
        inferer,
        data_meta: dict,
        device="cpu",
        pre_upsample: bool = True,
        stream_voxels: int = 64 * 2**20,
        chunk: int = 32,
        scale: int | None = None,
    ):
        self.stream_voxels = int(stream_voxels)
        self.chunk = int(chunk)
        self.network = network
        self.inferer = inferer
        self.meta = data_meta
        self.device = torch.device(device)
        self.scale = int(scale) if scale else None
        self.transform = pair_transform(
            data_meta, pre_upsample=pre_upsample, with_target=False, scale=self.scale
        )

    @torch.no_grad()
    def predict(self, lr: tio.ScalarImage) -> tio.ScalarImage:
        """SR of one LR image; returns a ``ScalarImage`` on the HR grid in HR units (float32)."""
        subject = self.transform(tio.Subject(image=lr))
        x = subject["image"].data[None].float().to(self.device)
        self.network.eval()
        y = self.inferer(x, self.network)[0].cpu()
        lo, hi = self.meta["hr_range"]
        y = y * (hi - lo) + lo
        affine = np.asarray(subject["image"].affine, dtype=float)
        if self.scale:  # the HR grid the LR working grid up-samples to (same corner)
            sp = np.linalg.norm(affine[:3, :3], axis=0)
            direction = affine[:3, :3] / sp
            hr_sp = sp / self.scale
            affine = affine.copy()
            affine[:3, :3] = direction * hr_sp
            affine[:3, 3] = affine[:3, 3] - direction @ (hr_sp * (self.scale - 1) / 2.0)
        return tio.ScalarImage(tensor=y.float(), affine=affine)

    def run(self, input_image: str | os.PathLike, output_image: str | os.PathLike) -> Path:
        """Read ``input_image``, predict, and write ``output_image`` atomically."""
        if Path(output_image).expanduser().resolve() == Path(input_image).expanduser().resolve():
            raise InputError(output_image, "output path equals the input path")
        lr = read_volume(input_image)
        from bone3d.data.simulate import hr_grid_for

        shape, _ = hr_grid_for(lr, self.meta["hr_spacing_mm"])
        if (
            not self.scale
            and int(np.prod(shape)) > self.stream_voxels
            and str(output_image).endswith((".nii", ".nii.gz"))
        ):
            from bone3d.inference.stream import stream_predict

            out = stream_predict(self, lr, output_image, chunk=self.chunk)
        else:
            img = self.predict(lr)
            shape = img.spatial_shape
            out = write_volume(img, output_image)
        sp = tuple(round(float(v), 6) for v in self.meta["hr_spacing_mm"])
        print(f"wrote {out}: shape {tuple(shape)}, spacing {sp} mm")
        return out
