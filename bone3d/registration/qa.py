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
from bone3d.registration.volume import Registration, to_ants


def matrix_offset(transform: ants.ANTsTransform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, o)`` with ``y = A x + o`` for an ITK matrix-offset transform (LPS mm)."""
    p = np.asarray(transform.parameters, float)
    a = p[:9].reshape(3, 3)
    centre = np.asarray(transform.fixed_parameters, float)
    return a, p[9:12] + centre - a @ centre


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

    Cubic B-spline interpolation by default (ANTs), 0 outside the LR field.
    """
    tx = reg.transform if reg is not None else ants.new_ants_transform(dimension=3)
    out = tx.apply_to_image(to_ants(lr), to_ants(reference), interpolation)
    data = out.numpy().astype(np.float32)
    return tio.ScalarImage(tensor=data[None], affine=np.asarray(reference.affine))


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 8 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float | None:
    """Histogram mutual information (nats), 32 equal-width bins per image."""
    from sklearn.metrics import mutual_info_score

    if a.size < 8 or a.std() == 0 or b.std() == 0:
        return None
    qa = np.digitize(a, np.linspace(a.min(), a.max(), bins + 1)[1:-1])
    qb = np.digitize(b, np.linspace(b.min(), b.max(), bins + 1)[1:-1])
    return float(mutual_info_score(qa, qb))


def similarity(hr: tio.Image, lr: tio.Image, reg: Registration | None) -> dict:
    """Mutual information and NCC between smoothed HR and resampled LR over covered HR voxels."""
    inside = coverage_mask(hr, lr, reg)
    if not inside.any():
        return {"mi_nats": None, "ncc": None, "covered_fraction": 0.0}
    sigma = reg.fixed_sigma_mm if reg is not None else list(map(float, lr.spacing))
    fixed = ants.smooth_image(to_ants(hr), sigma, sigma_in_physical_coordinates=True)
    moved = resample_lr(lr, hr, reg, "linear").data[0].numpy()
    f = fixed.numpy()
    a, b = f[inside].astype(np.float64), moved[inside].astype(np.float64)
    return {
        "mi_nats": _mutual_information(a, b),
        "ncc": _pearson(a, b),
        "covered_fraction": float(inside.mean()),
    }


def _norm(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def qa_figure(hr: tio.Image, moved: tio.Image, path: str | os.PathLike, title: str = "") -> Path:
    """Write the QA PNG (rows: axial, coronal, sagittal; columns: HR, LR, checkerboard, overlay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.util import compare_images

    h = _norm(hr.data[0].numpy().astype(np.float32))
    m = _norm(moved.data[0].numpy().astype(np.float32))
    cx, cy, cz = (s // 2 for s in h.shape)
    planes = [
        ("axial (z)", h[:, :, cz], m[:, :, cz]),
        ("coronal (y)", h[:, cy, :], m[:, cy, :]),
        ("sagittal (x)", h[cx, :, :], m[cx, :, :]),
    ]
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
