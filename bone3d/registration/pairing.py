"""From two independent scans of a specimen to a registered training pair, with its QA record.

`register_pair` registers LR to HR (`bone3d.registration.volume.register`) and writes into one
folder:

* ``transform.mat``: ANTs/ITK affine mapping HR physical points to LR physical points (LPS mm);
* ``lr.nii.gz``: the LR scan resampled into the HR frame **at LR spacing** (what post-upsampling
  models read; its grid starts at the HR crop's corner, the convention of
  `bone3d.data.simulate.hr_grid_for`, so `crop_to_lr_field` pairs it with ``hr.nii.gz``);
* ``lr_hrgrid.nii.gz``: the LR scan resampled onto the HR crop's grid (pre-upsampled models),
  streamed to disk z slab by z slab;
* ``hr.nii.gz``: the HR scan cropped to the common field of view: the largest box of HR voxels
  that all map inside the LR field, trimmed to a whole number of LR voxels;
* ``qa.json`` and ``qa.png`` (`bone3d.registration.qa`).

A pair is **flagged** (``accepted: false`` with the reasons) when the correlation after
registration is below ``min_ncc``, less than ``min_coverage`` of the HR field lies in the LR field,
the common field is under 4 LR voxels on an axis, or an affine result scales volume by more than
1.5x (a sign of wrong spacing in a header). Flagged pairs still get their files and QA, so the
reason can be inspected, but `bone3d.data.prepare` leaves them out of the datalist.

Memory: besides the two scans, the peak is about two HR volumes of float32 (the smoothed HR and
the resampled LR of the QA similarity) plus fixed slab buffers; the HR-grid steps run slab by
slab (`bone3d.registration.volume.smooth`, ``resample``). `benchmarks/registration_memory.py`
measures it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torchio as tio
from tqdm import tqdm

from bone3d.data.simulate import crop_to_lr_field, lr_affine
from bone3d.errors import InputError
from bone3d.io import nifti_slab_writer, write_json, write_volume
from bone3d.registration.qa import coverage_mask, qa_figure, resample_lr, similarity
from bone3d.registration.volume import (
    box_affine,
    register,
    resample,
    to_ants,
    write_transform,
    z_slabs,
)

log = logging.getLogger("bone3d.registration")

MIN_NCC = 0.5
MIN_COVERAGE = 0.5
MAX_SCALE = 1.5
MIN_LR_VOXELS = 4


def _check_geometry(hr: tio.Image, lr: tio.Image) -> None:
    hr_sp, lr_sp = np.asarray(hr.spacing, float), np.asarray(lr.spacing, float)
    if np.any(lr_sp < hr_sp * 0.999):
        raise InputError(
            "lr",
            f"LR spacing {lr_sp.round(5).tolist()} mm is finer than HR {hr_sp.round(5).tolist()}"
            " mm on some axis: scans swapped or a header spacing is wrong",
        )
    hr_ext = hr_sp * np.asarray(hr.spatial_shape)
    lr_ext = lr_sp * np.asarray(lr.spatial_shape)
    if np.prod(hr_ext) > 8 * np.prod(lr_ext):
        raise InputError(
            "hr",
            f"HR field {hr_ext.round(2).tolist()} mm is far larger than the LR field "
            f"{lr_ext.round(2).tolist()} mm: a header spacing is wrong",
        )


def largest_covered_box(covered: np.ndarray) -> tuple[slice, slice, slice] | None:
    """A large axis-aligned box of True voxels: the bounding box, shrunk face by face.

    Greedy: while the box holds uncovered voxels, drop the face slab with the largest uncovered
    fraction. Exact for the convex, nearly box-shaped overlaps of two rotated fields.
    """
    if not covered.any():
        return None
    lo, hi = np.zeros(3, int), np.zeros(3, int)
    for ax in range(3):  # the bounding box from the axis projections (no voxel index list)
        hit = np.flatnonzero(covered.any(axis=tuple(a for a in range(3) if a != ax)))
        lo[ax], hi[ax] = hit[0], hit[-1] + 1
    while True:
        box = covered[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if box.size == 0:
            return None
        if box.all():
            return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        worst, pick = -1.0, None
        for ax in range(3):
            if hi[ax] - lo[ax] <= 1:
                continue
            for side, sl in (("lo", 0), ("hi", -1)):
                face = np.take(box, sl, axis=ax)
                frac = 1.0 - face.mean()
                if frac > worst:
                    worst, pick = frac, (ax, side)
        if pick is None:
            return None
        ax, side = pick
        if side == "lo":
            lo[ax] += 1
        else:
            hi[ax] -= 1


def _crop(image: tio.Image, box) -> tio.Image:
    data = image.data[(slice(None), *box)]  # a view: crop_to_lr_field copies what is kept
    return type(image)(tensor=data, affine=box_affine(image.affine, [s.start for s in box]))


def _write_lr_hrgrid(lr: tio.Image, hr: tio.Image, reg, path: Path) -> Path:
    """The LR resampled (cubic B-spline) onto the HR grid, streamed to ``path`` z slab by z slab
    (`bone3d.io.nifti_slab_writer`): the HR-grid copy of the LR is never held in memory whole."""
    shape, affine = hr.spatial_shape, np.asarray(hr.affine, float)
    moving = to_ants(lr)
    with nifti_slab_writer(path, shape, affine) as dest:
        for z0, z1 in z_slabs(shape):
            box = (slice(0, shape[0]), slice(0, shape[1]), slice(z0, z1))
            dest[:, :, z0:z1] = resample(moving, reg.transform, shape, affine, box, "bspline")
    return Path(path)


def register_pair(
    hr: tio.Image,
    lr: tio.Image,
    out_dir: str | os.PathLike,
    *,
    type: str = "rigid",
    mask: tio.Image | None = None,
    seed: int = 0,
    init: str = "com",
    min_ncc: float = MIN_NCC,
    min_coverage: float = MIN_COVERAGE,
    name: str = "",
) -> dict:
    """Register, resample, crop and QA one LR/HR pair into ``out_dir``; returns the QA record."""
    _check_geometry(hr, lr)
    out = Path(out_dir)
    bar = tqdm(total=3, desc=f"register {name}".strip(), unit="step", disable=None)
    bar.set_postfix_str(type)
    reg = register(hr, lr, type=type, mask=mask, seed=seed, init=init)
    bar.update()
    bar.set_postfix_str("QA")
    before = similarity(hr, lr, None)
    after = similarity(hr, lr, reg)
    bar.update()
    bar.set_postfix_str("resample")
    reasons: list[str] = []
    det = reg.record()["determinant"]
    if abs(math.log(max(det, 1e-12))) > math.log(MAX_SCALE):
        reasons.append(f"transform scales volume by {det:.2f}: check the scans' spacing")
    if after["ncc"] is None or after["ncc"] < min_ncc:
        ncc = "undefined" if after["ncc"] is None else f"{after['ncc']:.3f}"
        reasons.append(f"correlation after registration {ncc} < {min_ncc}")
    if after["covered_fraction"] < min_coverage:
        reasons.append(
            f"only {after['covered_fraction']:.1%} of the HR field lies in the LR field "
            f"(< {min_coverage:.0%})"
        )

    files: dict[str, str] = {
        "transform": str(write_transform(reg.transform, out / "transform.mat"))
    }
    box = largest_covered_box(coverage_mask(hr, lr, reg))
    hr_sp, lr_sp = np.asarray(hr.spacing, float), np.asarray(lr.spacing, float)
    n_lr = None
    if box is not None:
        hr_box = _crop(hr, box)
        n_lr = [
            int(math.floor(n * a / b + 1e-6))
            for n, a, b in zip(hr_box.spatial_shape, hr_sp, lr_sp, strict=True)
        ]
    if n_lr is None or min(n_lr) < MIN_LR_VOXELS:
        reasons.append(f"common field of view under {MIN_LR_VOXELS} LR voxels on an axis")
    else:
        ref = tio.ScalarImage(
            tensor=np.zeros([1, *n_lr], np.float32), affine=lr_affine(hr_box.affine, hr_sp, lr_sp)
        )
        lr_out = resample_lr(lr, ref, reg)
        hr_out = crop_to_lr_field(hr_box, lr_out)
        files["lr"] = str(write_volume(lr_out, out / "lr.nii.gz"))
        files["lr_hrgrid"] = str(_write_lr_hrgrid(lr, hr_out, reg, out / "lr_hrgrid.nii.gz"))
        files["hr"] = str(write_volume(hr_out, out / "hr.nii.gz"))
        title = f"{name} ncc {before['ncc'] or 0:.2f} -> {after['ncc'] or 0:.2f}".strip()
        files["qa_png"] = str(qa_figure(hr_out, lr, reg, out / "qa.png", title))

    record = {
        "specimen": name,
        "accepted": not reasons,
        "reasons": reasons,
        "registration": reg.record(),
        "similarity_before": before,
        "similarity_after": after,
        "hr_covered_fraction": after["covered_fraction"],
        "common_field_hr_voxels": None if box is None else [s.stop - s.start for s in box],
        "common_field_lr_voxels": n_lr,
        "thresholds": {"min_ncc": min_ncc, "min_coverage": min_coverage, "max_scale": MAX_SCALE},
        "files": files,
    }
    write_json(record, out / "qa.json")
    bar.update()
    bar.close()
    if reasons:
        log.warning("pair %s flagged: %s", name or out, "; ".join(reasons))
    return record
