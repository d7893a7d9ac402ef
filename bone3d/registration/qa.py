"""Quality of a registration: similarity before/after, field coverage, and a checkerboard figure.

* **Similarity** is measured on the HR grid between the HR image (smoothed as for the metric,
  see `bone3d.registration.volume`) and the LR scan resampled there, over the HR voxels whose
  centres fall inside the LR field: mutual information (nats, 32-bin joint histogram,
  `sklearn.metrics.mutual_info_score`) and the Pearson correlation coefficient ``ncc`` (HU and
  mg HA/cm^3 are both linear in density, so a good pair has ``ncc`` near 1 and a failed
  registration near 0). "Before" uses the scans' own headers (identity transform).
* **Coverage**: the fraction of HR voxel centres that map inside the LR field (voxel centres
  within half a voxel of the LR grid's outer centres).
* **Figure**: three orthogonal slices through the HR centre: HR, LR resampled into the HR frame,
  their checkerboard (`skimage.util.compare_images`) and a magenta/green overlay.
"""

from __future__ import annotations

import os
from pathlib import Path

import ants
import numpy as np
import torchio as tio

from bone3d.io import write_figure
from bone3d.registration.volume import Registration, resample, smooth, to_ants, z_slabs


def matrix_offset(transform: ants.ANTsTransform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, o)`` with ``y = A x + o`` for an ITK matrix-offset transform (LPS mm)."""
    p = np.asarray(transform.parameters, float)
    a = p[:9].reshape(3, 3)
    centre = np.asarray(transform.fixed_parameters, float)
    return a, p[9:12] + centre - a @ centre


_MI_BINS = 32


def _lps_affine(image: tio.Image) -> np.ndarray:
    """Voxel index -> LPS mm, 4x4."""
    out = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, float)
    return out


def coverage_mask(hr: tio.Image, lr: tio.Image, reg: Registration | None) -> np.ndarray:
    """Boolean ``(X, Y, Z)`` on the HR grid: voxel centre maps inside the LR field."""
    a_hr = _lps_affine(hr)
    a_lr = np.linalg.inv(_lps_affine(lr))
    full = a_lr @ a_hr  # HR index -> LR index when there is no registration
    if reg is not None:
        a, o = matrix_offset(reg.transform)
        step = np.eye(4)
        step[:3, :3], step[:3, 3] = a, o
        full = a_lr @ step @ a_hr
    n = np.asarray(lr.spatial_shape, float)[:, None]
    nx, ny, nz = hr.spatial_shape
    out = np.zeros((nx, ny, nz), bool)
    yz = np.indices((ny, nz), dtype=np.float64).reshape(2, -1)
    for x in range(nx):  # one HR slice at a time: memory does not grow with the volume
        idx = np.vstack([np.full((1, yz.shape[1]), x, np.float64), yz])
        cont = full[:3, :3] @ idx + full[:3, 3:4]
        out[x] = np.all((cont >= -0.5) & (cont <= n - 0.5), axis=0).reshape(ny, nz)
    return out


def resample_lr(
    lr: tio.Image,
    reference: tio.Image,
    reg: Registration | None,
    interpolation: str = "bspline",
) -> tio.ScalarImage:
    """``lr`` resampled onto the grid of ``reference`` through ``reg`` (identity when None).

    Cubic B-spline interpolation by default (ANTs), 0 outside the LR field. Holds the whole
    output; `bone3d.registration.volume.resample` fills a large grid box by box.
    """
    tx = reg.transform if reg is not None else None
    data = resample(to_ants(lr), tx, reference.spatial_shape, reference.affine, None, interpolation)
    return tio.ScalarImage(tensor=data[None], affine=np.asarray(reference.affine))


def similarity(hr: tio.Image, lr: tio.Image, reg: Registration | None) -> dict:
    """Mutual information and NCC between smoothed HR and resampled LR over covered HR voxels.

    Memory: the smoothed HR and the resampled LR (two HR volumes of float32) and the coverage
    mask; the LR is resampled z slab by z slab (`resample`), and both statistics are gathered
    slab by slab, in float64, from the same values a whole-volume computation would use: the
    Pearson r from centred sums (two passes), the mutual information from the 32 x 32 joint
    histogram (`sklearn.metrics.mutual_info_score` with that contingency table).
    """
    from sklearn.metrics import mutual_info_score

    inside = coverage_mask(hr, lr, reg)
    n = int(inside.sum())
    if not n:
        return {"mi_nats": None, "ncc": None, "covered_fraction": 0.0}
    sigma = reg.fixed_sigma_mm if reg is not None else list(map(float, lr.spacing))
    fixed = smooth(hr, sigma)
    moving = to_ants(lr)
    tx = reg.transform if reg is not None else None
    shape, affine = hr.spatial_shape, hr.affine
    moved = np.empty(fixed.shape, np.float32)
    slabs = z_slabs(shape)
    for z0, z1 in slabs:
        box = (slice(0, shape[0]), slice(0, shape[1]), slice(z0, z1))
        moved[..., z0:z1] = resample(moving, tx, shape, affine, box, "linear")
    del moving

    def pairs():
        for z0, z1 in slabs:
            m = inside[..., z0:z1]
            if m.any():
                yield (
                    fixed[..., z0:z1][m].astype(np.float64),
                    moved[..., z0:z1][m].astype(np.float64),
                )

    sums, lo, hi = np.zeros(2), np.full(2, np.inf), np.full(2, -np.inf)
    for a, b in pairs():
        sums += (a.sum(), b.sum())
        lo = np.minimum(lo, (a.min(), b.min()))
        hi = np.maximum(hi, (a.max(), b.max()))
    mean = sums / n
    saa = sbb = sab = 0.0
    joint = np.zeros(_MI_BINS * _MI_BINS, np.int64)
    edges = [np.linspace(lo[i], hi[i], _MI_BINS + 1)[1:-1] for i in (0, 1)]
    for a, b in pairs():
        da, db = a - mean[0], b - mean[1]
        saa, sbb, sab = saa + da @ da, sbb + db @ db, sab + da @ db
        cell = np.digitize(a, edges[0]) * _MI_BINS + np.digitize(b, edges[1])
        joint += np.bincount(cell, minlength=_MI_BINS * _MI_BINS)
    varying = n >= 8 and saa > 0 and sbb > 0
    mi = mutual_info_score(None, None, contingency=joint.reshape(_MI_BINS, _MI_BINS))
    return {
        "mi_nats": float(mi) if varying else None,
        "ncc": float(sab / np.sqrt(saa * sbb)) if varying else None,
        "covered_fraction": float(inside.mean()),
    }


def qa_figure(
    hr: tio.Image,
    lr: tio.Image,
    reg: Registration | None,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Write the QA PNG (rows: axial, coronal, sagittal; columns: HR, LR, checkerboard, overlay).

    The three planes through the HR centre, and the LR resampled onto those planes alone
    (B-spline, as ``lr_hrgrid``); each image's grey values are stretched between the 1st and
    99th percentile of its three planes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.util import compare_images

    shape, affine = hr.spatial_shape, hr.affine
    moving = to_ants(lr)
    tx = reg.transform if reg is not None else None
    cut = {}
    for name, axis in (("axial (z)", 2), ("coronal (y)", 1), ("sagittal (x)", 0)):
        c = shape[axis] // 2
        box = tuple(slice(c, c + 1) if a == axis else slice(0, shape[a]) for a in range(3))
        h = hr.data[0].numpy()[box].astype(np.float32).squeeze(axis)
        cut[name] = (h, resample(moving, tx, shape, affine, box, "bspline").squeeze(axis))

    def stretch(k: int):
        lo, hi = np.percentile(np.concatenate([v[k].ravel() for v in cut.values()]), [1, 99])
        span = hi - lo if hi > lo else 1.0
        return [np.clip((v[k] - lo) / span, 0, 1) for v in cut.values()]

    planes = list(zip(cut, stretch(0), stretch(1), strict=True))
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for row, (name, a, b) in zip(axes, planes, strict=True):
        overlay = np.stack([a, b, a], axis=-1)  # HR magenta, LR green
        board = compare_images(a, b, method="checkerboard", n_tiles=(8, 8))
        for ax, img, label in zip(
            row,
            [a, b, board, overlay],
            ["HR", "LR registered", "checkerboard", "overlay"],
            strict=True,
        ):
            ax.imshow(np.swapaxes(img, 0, 1), cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return write_figure(fig, path, dpi=80)
