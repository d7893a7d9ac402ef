"""Streaming whole-stack inference: the output is written to a NIfTI on disk as it is
computed, so peak memory does not grow with the output volume (a 1536 x 1536 x 1024 micro-CT
stack is 9.7 GB as float32).

3D models (`_stream_windows`): MONAI's own window grid and Gaussian importance map, every window
run once, one row of windows (one z start) at a time; the LR is resampled only for that row's
slices, and slices no later window reaches are normalised and written. 2D / 2.5D models
(`_stream_slabs`): slabs of ``chunk`` slices, each with the slab half-width of context. Both equal
the whole-volume result up to float summation order (tested).

Writing is `bone3d.io.nifti_slab_writer`: the data go to ``.<name>.part.nii`` beside the
target; a ``.nii.gz`` target is compressed in a streamed pass; the target appears by an atomic
rename only when complete. A killed run leaves only the ``.part`` file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from tqdm import tqdm

from bone3d.data.patches import intensity_transform
from bone3d.data.simulate import hr_grid_for
from bone3d.io import nifti_slab_writer


def _span_function(inferer, shape):
    """(z0, z1) -> the input slices [a, b) whose prediction reproduces the whole-volume result
    on [z0, z1) exactly.

    3D sliding windows: the windows MONAI would place on the whole volume that touch [z0, z1);
    MONAI's window grid on [a, b) is then the same grid shifted by a (window starts are multiples
    of the scan interval, the last one clamped to the end), so every voxel of [z0, z1) gets the
    same windows and Gaussian weights as in a whole-volume run. Slab (2.5D) inferers: the slab
    half-width on each side.
    """
    from monai.data.utils import dense_patch_slices
    from monai.inferers import SlidingWindowInferer
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import fall_back_tuple

    nz = int(shape[2])
    if isinstance(inferer, SlidingWindowInferer):
        roi = fall_back_tuple(inferer.roi_size, shape)
        if roi[2] > nz:
            return lambda z0, z1: (0, nz)
        ov = inferer.overlap
        scan = _get_scan_interval(
            tuple(shape), roi, 3, tuple(ov) if isinstance(ov, (list, tuple)) else (ov,) * 3
        )
        starts = np.array(sorted({s[2].start for s in dense_patch_slices(tuple(shape), roi, scan)}))
        rz = int(roi[2])

        def span(z0, z1):
            hit = starts[(starts < z1) & (starts + rz > z0)]
            return int(hit.min()), int(hit.max()) + rz

        return span
    halo = int(getattr(inferer, "halo", 0))
    return lambda z0, z1: (max(0, z0 - halo), min(nz, z1 + halo))


def _resample_rows(lr: tio.ScalarImage, shape, affine, z0: int, nz: int) -> tio.ScalarImage:
    """The LR resampled (trilinear) onto HR slices ``[z0, z0 + nz)`` of the HR grid, reading
    only the LR slices those HR slices fall between (plus one on each side), so each step
    touches a thin slab of the LR, not the whole stack."""
    sub_affine = affine.copy()
    sub_affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * z0
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, nz - 1)]
    )
    lr_idx = (np.linalg.inv(np.asarray(lr.affine)) @ sub_affine @ corners.T)[:3]
    nlz = lr.spatial_shape[2]
    a = int(np.clip(np.floor(lr_idx[2].min()) - 1, 0, nlz - 1))
    b = int(np.clip(np.ceil(lr_idx[2].max()) + 2, a + 1, nlz))
    lr_affine = np.asarray(lr.affine, dtype=float).copy()
    lr_affine[:3, 3] = lr_affine[:3, 3] + lr_affine[:3, 2] * a
    part = tio.ScalarImage(tensor=lr.data[..., a:b].clone(), affine=lr_affine)
    return tio.Resample(((shape[0], shape[1], nz), sub_affine), image_interpolation="linear")(part)


def _window_groups(inferer, shape):
    """For a 3D ``SlidingWindowInferer`` whose window fits in the stack: MONAI's window slices
    on the whole volume grouped by z start, and MONAI's importance map; otherwise None (slab
    inferers, or a window as deep as the stack, where MONAI would pad)."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers import SlidingWindowInferer
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import fall_back_tuple

    if not isinstance(inferer, SlidingWindowInferer):
        return None
    roi = fall_back_tuple(inferer.roi_size, shape)
    if any(r >= n for r, n in zip(roi, shape, strict=True)):
        return None
    ov = inferer.overlap
    scan = _get_scan_interval(
        tuple(shape), roi, 3, tuple(ov) if isinstance(ov, (list, tuple)) else (ov,) * 3
    )
    groups: dict[int, list] = {}
    for sl in dense_patch_slices(tuple(shape), roi, scan):
        groups.setdefault(sl[2].start, []).append(sl[:2])
    imp = compute_importance_map(
        roi, mode=inferer.mode, sigma_scale=inferer.sigma_scale, device="cpu"
    )
    return sorted(groups.items()), imp.float(), int(roi[2]), int(inferer.sw_batch_size)


def _stream_windows(predictor, lr, shape, affine, rescale, out, groups, imp, rz, batch, progress):
    """MONAI's sliding window, streamed: the same windows, the same importance map and the same
    weighted average as ``SlidingWindowInferer`` on the whole volume, but taken one z start at a
    time. The input is resampled for ``[s, s + rz)`` only, every window is run once, and slices
    before the next z start, which no later window reaches, are normalised and written; the
    buffers hold ``rz`` slices, so memory grows with X * Y * roi_z, not with the stack.

    Hand-written because MONAI's sliding window (``buffer_steps`` included) keeps the whole
    output in memory and no maintained library streams it to disk.
    """
    lo, hi = predictor.meta["hr_range"]
    nz = int(shape[2])
    acc = torch.zeros((shape[0], shape[1], rz), dtype=torch.float32)
    cnt = torch.zeros((shape[0], shape[1], rz), dtype=torch.float32)
    starts = [s for s, _ in groups]
    for i, (s, windows) in enumerate(
        tqdm(groups, desc="window rows", disable=None if progress else True)
    ):
        sub_affine = affine.copy()
        sub_affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * s
        sub = tio.Resample(((shape[0], shape[1], rz), sub_affine), image_interpolation="linear")(lr)
        x = rescale(tio.Subject(image=sub))["image"].data.float()  # (1, X, Y, rz)
        for b0 in range(0, len(windows), batch):
            chunk = windows[b0 : b0 + batch]
            xb = torch.stack([x[:, sx, sy, :] for sx, sy in chunk]).to(predictor.device)
            with torch.no_grad():
                yb = predictor.network(xb).float().cpu()
            for (sx, sy), y in zip(chunk, yb, strict=True):
                acc[sx, sy, :] += y[0] * imp
                cnt[sx, sy, :] += imp
        done = (starts[i + 1] if i + 1 < len(starts) else nz) - s  # final slices [s, s + done)
        out[:, :, s : s + done] = ((acc[:, :, :done] / cnt[:, :, :done]) * (hi - lo) + lo).numpy()
        acc = torch.cat([acc[:, :, done:], torch.zeros_like(acc[:, :, :done])], dim=2)
        cnt = torch.cat([cnt[:, :, done:], torch.zeros_like(cnt[:, :, :done])], dim=2)


def _stream_slabs(predictor, lr, shape, affine, rescale, out, span, chunk, progress):
    """Slabs of ``chunk`` output slices, each predicted from the input slices ``span`` says
    reproduce the whole-volume result (2.5D: the slab half-width on each side)."""
    lo, hi = predictor.meta["hr_range"]
    nz = shape[2]
    for z0 in tqdm(range(0, nz, chunk), desc="slabs", disable=None if progress else True):
        z1 = min(nz, z0 + chunk)
        a, b = span(z0, z1)
        sub = _resample_rows(lr, shape, affine, a, b - a)
        x = rescale(tio.Subject(image=sub))["image"].data[None].float().to(predictor.device)
        with torch.no_grad():
            y = predictor.inferer(x, predictor.network)[0, 0, :, :, z0 - a : z1 - a].cpu().numpy()
        out[:, :, z0:z1] = y * (hi - lo) + lo
        del x, y


def stream_predict(
    predictor,
    lr: tio.ScalarImage,
    output: str | os.PathLike,
    *,
    chunk: int = 32,
    progress: bool = True,
) -> Path:
    """Predict ``lr`` with ``predictor`` (a `VolumePredictor`) into ``output`` as it is computed:
    one row of 3D windows at a time (`_stream_windows`), or ``chunk`` slices at a time for 2D /
    2.5D inferers and windows as deep as the stack (`_stream_slabs`)."""
    shape, affine = hr_grid_for(lr, predictor.meta["hr_spacing_mm"])
    span = _span_function(predictor.inferer, shape)
    rescale = intensity_transform(predictor.meta["lr_range"], None)
    target = Path(output).expanduser()
    with nifti_slab_writer(target, shape, affine) as out:
        predictor.network.eval()
        groups = _window_groups(predictor.inferer, shape)
        if groups is not None:
            _stream_windows(predictor, lr, shape, affine, rescale, out, *groups, progress)
        else:
            _stream_slabs(predictor, lr, shape, affine, rescale, out, span, chunk, progress)
    return target
