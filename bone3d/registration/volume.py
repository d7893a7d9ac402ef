"""Whole-volume registration of an LR scan to an HR scan of the same specimen (ANTsPy).

Convention (the one ANTs uses for ``fixed = HR, moving = LR``): the transform maps **HR physical
points to LR physical points**, in ITK/LPS millimetres. Resampling the LR scan into the HR frame
(``ants.apply_transforms(fixed=HR grid, moving=LR, transformlist=[transform])``) uses it as is;
the same file read by ITK/SimpleITK/ANTs gives the same mapping.

Steps:

1. **Initial alignment**: ANTs' intensity centre of mass (``init="com"``), or
   ``init="search"``: `ants.affine_initializer` (a search over rotations of up to 18 degrees and
   translations; only the nearest rotation of its result is kept). ``init="auto"`` (default)
   starts from the centre of mass and, when the correlation after registration is below 0.5
   (the HR core and the LR field have different centres of mass, so the optimiser can stop in a
   wrong minimum: 1 of 6 trials on the LHDL core with the ``mdct`` preset), runs again from the
   search and keeps the result with the higher correlation. Both attempts are recorded.
2. **Rigid**, then for ``type="affine"`` **affine** (started from the rigid result), Mattes
   mutual information (32 bins; the two scans differ in modality, units and noise), three
   resolution levels (shrink 4, 2, 1; smoothing 2, 1, 0 voxels), regular random sampling of 20 %
   seeded by ``seed``.
3. **Very different spacings**: the metric is evaluated on the HR grid, but the HR image is first
   smoothed with a Gaussian (`smooth`) of sigma = ``fixed_sigma_lr_vox`` LR voxels per axis
   and, when it is much finer than the LR scan, resampled to half the finest LR spacing. Matching the detail of
   the two images removes most of the bias mutual information has between a sharp and a blurred
   image of the same structure: on phantoms a sigma of 0.5 LR voxel left 0.19 LR voxel of target
   registration error with the ``mdct`` preset, 0.9-1.1 LR voxel left 0.07-0.1 (see
   ``benchmarks/registration.py``).
4. **Field of view**: the metric only sees the HR field (the fixed image); an optional ``mask``
   on the HR grid restricts it further (e.g. the cylindrical field of a micro-CT scanner).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ants
import ants.config
import numpy as np
import torchio as tio

from bone3d.errors import InputError
from bone3d.io import atomic_path, check_image

# see _ants_seed: must be set before ANTs' ITK creates its first filter
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

TYPES = ("rigid", "affine")
INITS = ("auto", "com", "search")
RETRY_NCC = 0.5  # init="auto": below this correlation after the centre-of-mass start, search
SLAB_VOXELS = 1 << 23  # voxels per z slab in the slab-wise steps (32 MiB of float32)
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS+ (TorchIO, nibabel) <-> LPS (ITK, ANTs)
_RESAMPLE_MARGIN = 12  # moving voxels kept beyond a box's reach (see `resample`)


@dataclass
class Registration:
    """Result of `register`: ``transform`` maps HR physical points to LR points (LPS mm)."""

    transform: ants.ANTsTransform
    type: str
    init: str
    seed: int
    fixed_sigma_mm: list[float]
    metric_grid_mm: list[float]
    elapsed_s: float
    stages: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        matrix = np.asarray(self.transform.parameters[:9], float).reshape(3, 3)
        return {
            "type": self.type,
            "init": self.init,
            "seed": self.seed,
            "stages": self.stages,
            "attempts": self.attempts,
            "metric": "Mattes mutual information, 32 bins, 20 % regular random sampling",
            "fixed_sigma_mm": self.fixed_sigma_mm,
            "metric_grid_mm": self.metric_grid_mm,
            "elapsed_s": self.elapsed_s,
            "matrix": matrix.tolist(),
            "translation_mm": list(map(float, self.transform.parameters[9:12])),
            "centre_mm": list(map(float, self.transform.fixed_parameters)),
            "determinant": float(np.linalg.det(matrix)),
            "convention": "ITK/ANTs affine in LPS mm, maps HR (fixed) points to LR (moving) "
            "points; ants.apply_transforms(fixed=HR, moving=LR) resamples LR into the HR frame",
        }

    def apply_to_points(self, points_lps: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` HR physical points (LPS mm) to LR physical points."""
        return np.asarray([self.transform.apply_to_point(list(map(float, p))) for p in points_lps])


def ants_image(array: np.ndarray, affine) -> ants.ANTsImage:
    """A float32 ANTs image of an ``(X, Y, Z)`` array on the grid of a RAS+ ``affine`` (TorchIO's
    convention), in ANTs' ITK/LPS frame. One copy of the voxels (TorchIO's SimpleITK route to
    ANTs makes three)."""
    a = np.asarray(affine, float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    return ants.from_numpy(
        np.asarray(array, np.float32),
        origin=(_LPS @ a[:3, 3]).tolist(),
        spacing=spacing.tolist(),
        direction=_LPS @ (a[:3, :3] / spacing),
    )


def to_ants(image: tio.Image) -> ants.ANTsImage:
    """A single-channel TorchIO image as a float32 ANTs image (same physical frame; ITK/LPS)."""
    return ants_image(image.data[0].numpy(), image.affine)


def z_slabs(shape, voxels: int | None = None) -> list[tuple[int, int]]:
    """``[z0, z1)`` ranges of whole z slices of a grid of ``shape``, about ``voxels`` each
    (default `SLAB_VOXELS`)."""
    voxels = SLAB_VOXELS if voxels is None else int(voxels)
    per = max(1, voxels // max(1, int(shape[0]) * int(shape[1])))
    return [(z, min(int(shape[2]), z + per)) for z in range(0, int(shape[2]), per)]


def box_affine(affine, start) -> np.ndarray:
    """The RAS+ affine of the sub-grid whose voxel 0 is voxel ``start`` of ``affine``'s grid."""
    out = np.asarray(affine, float).copy()
    out[:3, 3] = out[:3, 3] + out[:3, :3] @ np.asarray(start, float)
    return out


def smooth(image: tio.Image, sigma_mm) -> np.ndarray:
    """A Gaussian of ``sigma_mm`` (mm per axis) over a TorchIO image: ``(X, Y, Z)`` float32.

    ``scipy.ndimage.gaussian_filter1d`` along x, y, z in turn (what ``gaussian_filter`` does;
    kernel to 4 sigma, edges replicated as ITK's zero-flux Neumann condition does), the x and y
    passes z slab by z slab (`z_slabs`) and the z pass x slab by x slab into the one output
    array: the whole-volume result at one volume of memory. Not ``ants.smooth_image``: ITK's
    discrete Gaussian behind it holds four volumes, truncates its kernel at 32 voxels, and returns
    NaN everywhere from a sigma of about 27 voxels (a 0.6 mm CT slice over 20 um micro-CT
    voxels is 30; `tests/test_registration.py`).
    """
    from scipy.ndimage import gaussian_filter1d

    data = image.data[0].numpy()
    sd = np.asarray(sigma_mm, float) / np.asarray(image.spacing, float)
    out = np.empty(data.shape, np.float32)
    for z0, z1 in z_slabs(data.shape):
        block = np.asarray(data[..., z0:z1], np.float32)
        for axis in (0, 1):
            if sd[axis] > 0:
                block = gaussian_filter1d(block, sd[axis], axis=axis, mode="nearest", truncate=4.0)
        out[..., z0:z1] = block
    if sd[2] > 0:
        per = max(1, SLAB_VOXELS // max(1, data.shape[1] * data.shape[2]))
        for x0 in range(0, data.shape[0], per):
            part = out[x0 : x0 + per]
            part[...] = gaussian_filter1d(part, sd[2], axis=2, mode="nearest", truncate=4.0)
    return out


def resample(
    moving: ants.ANTsImage,
    transform: ants.ANTsTransform | None,
    shape,
    affine,
    box: tuple[slice, slice, slice] | None = None,
    interpolation: str = "linear",
) -> np.ndarray:
    """``moving`` resampled through ``transform`` (HR to LR physical points, as `register`
    returns; None: identity) onto the voxels ``box`` of the grid ``shape`` / RAS+ ``affine``
    (default: all), 0 outside the moving field; a float32 array of the box's shape.

    Only the part of ``moving`` the box maps into is passed to ANTs, with 12 voxels more on
    each side: exact for linear and nearest-neighbour interpolation; for ``bspline`` the
    prefilter's pole (2 - sqrt 3 = 0.268) leaves 0.268^12 ~ 1e-7 of a voxel value from beyond
    the margin. So a large grid can be filled box by box (`z_slabs`) at the memory of one box.
    """
    box = box or tuple(slice(0, int(n)) for n in shape)
    start = np.array([s.start for s in box], float)
    size = [int(s.stop - s.start) for s in box]
    sub = box_affine(affine, start)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing="ij")).reshape(3, -1)
    lps = _LPS @ (sub[:3, :3] @ corners + sub[:3, 3:4])
    if transform is not None:
        lps = np.array([transform.apply_to_point(tuple(p)) for p in lps.T]).T
    m_dir = np.asarray(moving.direction, float) * np.asarray(moving.spacing, float)
    idx = np.linalg.solve(m_dir, lps - np.asarray(moving.origin, float)[:, None])
    n_m = np.asarray(moving.shape)
    lo = np.clip(np.floor(idx.min(1)).astype(int) - _RESAMPLE_MARGIN, 0, n_m)
    hi = np.clip(np.ceil(idx.max(1)).astype(int) + _RESAMPLE_MARGIN + 1, 0, n_m)
    if np.any(hi <= lo):  # the box maps wholly outside the moving field
        return np.zeros(size, np.float32)
    part = ants.crop_indices(moving, lo.tolist(), hi.tolist())
    tx = transform if transform is not None else ants.new_ants_transform(dimension=3)
    reference = ants_image(np.zeros(size, np.float32), sub)
    return tx.apply_to_image(part, reference, interpolation).numpy().astype(np.float32, copy=False)


def from_ants(image: ants.ANTsImage, label: bool = False) -> tio.Image:
    cls = tio.LabelMap if label else tio.ScalarImage
    return cls.from_sitk(ants.to_sitk(image))


@contextlib.contextmanager
def _ants_seed(seed: int):
    """Seed ANTs' metric sampling for one call.

    antspyx 0.6.3 ignores a ``random_seed`` keyword and passes ``--random-seed`` only from
    ``ants.config._random_seed``, so the seed is set there and restored afterwards. Multi-threaded
    ITK sums the metric in a varying order (results then differ in the fifth digit between runs),
    so unless the user set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` bone3d runs ANTs single-
    threaded (about 1.5x slower on two cores) to make a seed reproduce a transform exactly. ITK
    reads that variable once, at its first use in the process.
    """
    previous = ants.config._random_seed
    ants.config._random_seed = int(seed) + 1  # ANTs seeds from the clock when given 0
    try:
        yield
    finally:
        ants.config._random_seed = previous


def _nearest_rigid(tx: ants.ANTsTransform, fixed: ants.ANTsImage) -> ants.ANTsTransform:
    """The rotation nearest to ``tx``'s matrix (SVD polar factor), same map of the HR centre.

    `ants.affine_initializer` fits scale and shear as well; a rigid registration started from
    that would keep them (measured: ~7 % scale on the LHDL core), so only its rotation is kept.
    """
    p = np.asarray(tx.parameters, float)
    a = p[:9].reshape(3, 3)
    centre = np.asarray(tx.fixed_parameters, float)
    u, _, vt = np.linalg.svd(a)
    rot = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    half = (np.asarray(fixed.shape, float) - 1) / 2 * np.asarray(fixed.spacing, float)
    c = np.asarray(fixed.origin, float) + np.asarray(fixed.direction, float) @ half
    offset = p[9:12] + centre - a @ centre  # y = a x + offset
    out = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=rot,
        center=c,
        translation=a @ c + offset - c,
    )
    return out


def _check_contrast(image: tio.Image, name: str) -> None:
    data = image.data[0]
    if float(data.max() - data.min()) <= 0:
        raise InputError(name, "blank volume (one grey value): nothing to register on")


def _fixed_for_metric(hr: tio.Image, lr_spacing, sigma_lr_vox: float):
    hr_sp = np.asarray(hr.spacing, float)
    lr_sp = np.asarray(lr_spacing, float)
    sigma = (sigma_lr_vox * lr_sp).tolist()
    data = smooth(hr, sigma) if sigma_lr_vox else hr.data[0].numpy()
    fixed = ants_image(data, hr.affine)
    del data
    grid = float(max(hr_sp.min(), lr_sp.min() / 2.0))
    if grid > hr_sp.min() * 1.25:  # only worth resampling when it saves a lot
        fixed = ants.resample_image(fixed, (grid,) * 3, use_voxels=False, interp_type=0)
    return fixed, sigma, list(map(float, fixed.spacing))


def _run(fixed, moving, init: str, type: str, common: dict, prefix: Path):
    """One ANTs rigid (+ affine) run from the given initialisation; the transform and stages."""
    prefix.mkdir(parents=True, exist_ok=True)
    initial = None
    if init == "search":
        found = ants.affine_initializer(
            fixed, moving, search_factor=10, radian_fraction=0.1, local_search_iterations=0
        )
        initial = str(prefix / "init.mat")
        ants.write_transform(_nearest_rigid(ants.read_transform(found), fixed), initial)
    stages = ["rigid"]
    out = ants.registration(
        fixed,
        moving,
        type_of_transform="Rigid",
        initial_transform=initial,
        outprefix=str(prefix / "rigid_"),
        **common,
    )
    final = out["fwdtransforms"][0]
    if type == "affine":
        stages.append("affine")
        out = ants.registration(
            fixed,
            moving,
            type_of_transform="Affine",
            initial_transform=[final],
            outprefix=str(prefix / "affine_"),
            **common,
        )
        final = out["fwdtransforms"][0]
    return ants.read_transform(final), stages


def _quick_ncc(fixed, moving, transform) -> tuple[float, float]:
    """Pearson r of fixed and moved moving over the fixed voxels inside the moving field."""
    moved = transform.apply_to_image(moving, fixed, "linear").numpy()
    ones = ants.from_numpy(
        np.ones(moving.shape, np.float32),
        origin=moving.origin,
        spacing=moving.spacing,
        direction=moving.direction,
    )
    inside = transform.apply_to_image(ones, fixed, "nearestneighbor").numpy() > 0.5
    if inside.sum() < 8:
        return -1.0, 0.0
    a, b = fixed.numpy()[inside], moved[inside]
    if a.std() == 0 or b.std() == 0:
        return -1.0, float(inside.mean())
    return float(np.corrcoef(a, b)[0, 1]), float(inside.mean())


def register(
    hr: tio.Image,
    lr: tio.Image,
    *,
    type: str = "rigid",
    mask: tio.Image | None = None,
    seed: int = 0,
    init: str = "auto",
    fixed_sigma_lr_vox: float = 1.0,
    iterations: tuple[int, int, int] = (1000, 500, 200),
) -> Registration:
    """Register ``lr`` (moving) to ``hr`` (fixed); see the module docstring for the steps.

    Args:
        hr: HR scan (fixed), any units.
        lr: LR scan (moving), any units; may cover a larger field than ``hr``.
        type: ``"rigid"`` or ``"affine"`` (rigid first, then affine).
        mask: optional binary mask on the HR grid where the metric is evaluated.
        seed: seeds the metric's random sampling; same seed and inputs give the same transform.
        init: ``"com"``, ``"search"`` or ``"auto"`` (see module docstring).
        fixed_sigma_lr_vox: smoothing of the HR image for the metric, in LR voxels per axis.

    Raises:
        InputError: unknown type/init, a blank volume, a mask that is empty or on another grid.
    """
    if type not in TYPES:
        raise InputError("type", f"unknown registration type {type!r}; choose from {TYPES}")
    if init not in INITS:
        raise InputError("init", f"unknown initialisation {init!r}; choose from {INITS}")
    check_image(hr, "hr")
    check_image(lr, "lr")
    _check_contrast(hr, "hr")
    _check_contrast(lr, "lr")
    t0 = time.perf_counter()
    fixed, sigma, grid = _fixed_for_metric(hr, lr.spacing, fixed_sigma_lr_vox)
    moving = to_ants(lr)
    ants_mask = None
    if mask is not None:
        if tuple(mask.spatial_shape) != tuple(hr.spatial_shape) or not np.allclose(
            mask.affine, hr.affine, atol=1e-4
        ):
            raise InputError("mask", "mask is not on the HR grid")
        if not bool((mask.data > 0).any()):
            raise InputError("mask", "empty mask")
        binary = tio.ScalarImage(tensor=(mask.data > 0).float(), affine=mask.affine)
        ants_mask = ants.resample_image_to_target(to_ants(binary), fixed, "nearestNeighbor")

    common = dict(
        aff_metric="mattes",
        aff_sampling=32,
        aff_random_sampling_rate=0.2,
        aff_shrink_factors=(4, 2, 1),
        aff_smoothing_sigmas=(2, 1, 0),
        aff_iterations=tuple(iterations),
        mask=ants_mask,
    )
    attempts = []
    with tempfile.TemporaryDirectory(prefix="bone3d-reg-") as tmp, _ants_seed(seed):
        for start in ("com", "search") if init == "auto" else (init,):
            transform, stages = _run(fixed, moving, start, type, common, Path(tmp) / start)
            ncc, covered = _quick_ncc(fixed, moving, transform)
            attempts.append(
                {
                    "init": start,
                    "ncc": ncc,
                    "covered": covered,
                    "transform": transform,
                    "stages": stages,
                }
            )
            if ncc >= RETRY_NCC and covered >= 0.5:
                break
    best = max(attempts, key=lambda a: a["ncc"])
    transform = best["transform"]
    return Registration(
        transform=transform,
        type=type,
        init=best["init"],
        seed=int(seed),
        attempts=[{k: a[k] for k in ("init", "ncc", "covered")} for a in attempts],
        fixed_sigma_mm=[float(s) for s in sigma],
        metric_grid_mm=grid,
        elapsed_s=time.perf_counter() - t0,
        stages=best["stages"],
    )


def write_transform(transform: ants.ANTsTransform, path: str | os.PathLike) -> Path:
    """Write an ANTs/ITK transform file atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        ants.write_transform(transform, str(tmp))
    return Path(path)


def lps_corners(image: tio.Image) -> np.ndarray:
    """The eight corner voxel centres of ``image`` in LPS mm, ``(8, 3)``."""
    ref = image.as_sitk()
    n = np.asarray(ref.GetSize()) - 1
    return np.asarray(
        [
            ref.TransformContinuousIndexToPhysicalPoint((np.asarray(ix) * n).tolist())
            for ix in np.ndindex(2, 2, 2)
        ]
    )


def target_registration_error(
    found: Registration, truth, hr: tio.Image, lr_spacing
) -> dict[str, float]:
    """TRE over the HR field's corner points: mean displacement between recovered and true maps.

    ``truth`` is any object with ``TransformPoint`` (SimpleITK) mapping HR to LR points. Returned
    in mm and in LR voxels (each displacement divided by the LR spacing per axis, then its norm,
    so an anisotropic LR voxel counts as one voxel along each of its axes).
    """
    pts = lps_corners(hr)
    got = found.apply_to_points(pts)
    want = np.asarray([truth.TransformPoint(list(map(float, p))) for p in pts])
    d = got - want
    return {
        "tre_mm": float(np.linalg.norm(d, axis=1).mean()),
        "tre_lr_vox": float(np.linalg.norm(d / np.asarray(lr_spacing, float), axis=1).mean()),
        "max_mm": float(np.linalg.norm(d, axis=1).max()),
    }
