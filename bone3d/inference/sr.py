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
        stream_voxels: outputs with more voxels than this (default 64 Mi, 256 MB as float32) are
            written slab by slab into a memory-mapped NIfTI (`bone3d.inference.stream`).
        chunk: slices per slab when streaming.
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
    ):
        self.stream_voxels = int(stream_voxels)
        self.chunk = int(chunk)
        self.network = network
        self.inferer = inferer
        self.meta = data_meta
        self.device = torch.device(device)
        self.transform = pair_transform(data_meta, pre_upsample=pre_upsample, with_target=False)

    @torch.no_grad()
    def predict(self, lr: tio.ScalarImage) -> tio.ScalarImage:
        """SR of one LR image; returns a ``ScalarImage`` on the HR grid in HR units (float32)."""
        subject = self.transform(tio.Subject(image=lr))
        x = subject["image"].data[None].float().to(self.device)
        self.network.eval()
        y = self.inferer(x, self.network)[0].cpu()
        lo, hi = self.meta["hr_range"]
        y = y * (hi - lo) + lo
        return tio.ScalarImage(tensor=y.float(), affine=np.asarray(subject["image"].affine))

    def run(self, input_image: str | os.PathLike, output_image: str | os.PathLike) -> Path:
        """Read ``input_image``, predict, and write ``output_image`` atomically."""
        if Path(output_image).expanduser().resolve() == Path(input_image).expanduser().resolve():
            raise InputError(output_image, "output path equals the input path")
        lr = read_volume(input_image)
        from bone3d.data.simulate import hr_grid_for

        shape, _ = hr_grid_for(lr, self.meta["hr_spacing_mm"])
        if int(np.prod(shape)) > self.stream_voxels and str(output_image).endswith(
            (".nii", ".nii.gz")
        ):
            from bone3d.inference.stream import stream_predict

            out = stream_predict(self, lr, output_image, chunk=self.chunk)
        else:
            out = write_volume(self.predict(lr), output_image)
        sp = tuple(round(float(v), 6) for v in self.meta["hr_spacing_mm"])
        print(f"wrote {out}: shape {tuple(shape)}, spacing {sp} mm")
        return out
