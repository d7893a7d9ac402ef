"""CT degradation model: a high-resolution (micro-CT) volume to a realistic low-resolution scan.

The steps follow the linear shift-invariant imaging chain used to simulate clinical CT from
micro-CT (e.g. Prevrhal et al. 1999, Phys Med Biol 44:751; Chen et al. 2018, "Efficient and
accurate MRI/CT super-resolution", and the degradation pipelines of the SR studies bone3d
reproduces):

1. **Calibration to HU**: ``HU = hu_slope * I + hu_intercept``. The phantom's mg HA/cm^3 map
   to HU with the slope of a typical K2HPO4/HA calibration at 120 kVp (~1.4 HU per mg HA/cm^3,
   so 1000 mg HA/cm^3 tissue reads ~1400 HU, cortical bone's usual range). Inputs in other units
   (e.g. an 8-bit micro-CT) are mapped with ``intensity_map=(marrow_value, bone_value)``.
2. **Misalignment** (optional): a random rigid transform (rotation about the volume centre and a
   shift), so that LR and HR are no longer voxel-aligned and registration is needed. The true
   transform is returned.
3. **Point spread function**: an anisotropic Gaussian with the given FWHM (mm) per in-plane axis,
   and a **slice-sensitivity profile** along z, also Gaussian with FWHM = the nominal slice
   thickness (the bell-shaped SSP of spiral CT; ``sigma = FWHM / (2 sqrt(2 ln 2))``).
4. **Sampling**: each LR voxel is the mean of the blurred image over its own footprint
   (detector/voxel aperture), computed with exact overlap weights, so any (also non-integer)
   ratio of spacings resamples without aliasing beyond what the PSF and the aperture leave,
   as in a real scanner. Where the PSF is narrower than one LR voxel on an axis, an extra
   Gaussian brings it to one LR voxel FWHM (recorded in the result), so sampling never aliases.
5. **Noise**: Gaussian (``noise_hu`` = SD in HU, or ``snr`` = bone-marrow contrast / SD) or
   Poisson-Gaussian (signal-dependent variance ``gain * (HU - hu_min) + noise_hu^2``), white on
   the LR grid, seeded.

The LR grid covers the same physical extent as the HR volume (footprint to footprint): LR voxel 0
starts where HR voxel 0 starts, so ``lr_origin = hr_origin + (lr_spacing - hr_spacing) / 2``
along each axis; the HR extent is cropped to a whole number of LR voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import SimpleITK as sitk
import torchio as tio
from scipy import ndimage as ndi
from scipy import sparse

from bone3d.errors import InputError
from bone3d.io import check_image, make_image

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class Preset:
    """A scanner model. Lengths in mm, (x, y, z) order; z is the slice axis."""

    name: str
    spacing_mm: tuple[float, float, float]
    psf_fwhm_mm: tuple[float, float, float]
    noise: str = "gaussian"  # "gaussian" | "poisson_gaussian" | "none"
    noise_hu: float = 0.0
    snr: float | None = None
    gain: float = 0.0  # poisson_gaussian: HU^2 of variance per HU of signal
    hu_slope: float = 1.4
    hu_intercept: float = 0.0
    description: str = ""


PRESETS: dict[str, Preset] = {
    # Clinical MDCT of vertebrae as in the pix2pixHD / FUNIT vertebra studies: 512^2 matrix over a
    # 100 mm field of view (0.195 mm pixels), 0.6 mm slice thickness reconstructed every 0.1 mm,
    # in-plane resolution ~0.3-0.5 mm (a sharp bone kernel); noise ~40 HU in a bone kernel at
    # 120 kVp (Link et al. 1998, Ito et al. 1998: in-plane 0.3-0.5 mm, 0.5-1 mm slices).
    "mdct": Preset(
        name="mdct",
        spacing_mm=(100.0 / 512, 100.0 / 512, 0.1),
        psf_fwhm_mm=(0.4, 0.4, 0.6),
        noise="gaussian",
        noise_hu=40.0,
        description="clinical MDCT: 0.195 mm pixels, 0.6 mm slices every 0.1 mm, 0.4 mm in-plane FWHM",
    ),
    # HR-pQCT (Scanco XtremeCT-like): 82 um isotropic voxels, spatial resolution ~100-130 um
    # (Boutroy et al. 2005, JCEM 90:6508; MacNeil & Boyd 2007), noise ~SNR 10 bone/marrow.
    "hrpqct": Preset(
        name="hrpqct",
        spacing_mm=(0.082, 0.082, 0.082),
        psf_fwhm_mm=(0.12, 0.12, 0.12),
        noise="gaussian",
        snr=10.0,
        description="HR-pQCT: 82 um isotropic voxels, 0.12 mm FWHM, SNR 10",
    ),
    # Murine femur/spine micro-CT, 10 -> 20 um voxels (the murine U-Net study's x2 setting).
    "microct_x2": Preset(
        name="microct_x2",
        spacing_mm=(0.020, 0.020, 0.020),
        psf_fwhm_mm=(0.025, 0.025, 0.025),
        noise="gaussian",
        snr=15.0,
        description="fast micro-CT: 20 um voxels (x2 from 10 um), 25 um FWHM, SNR 15",
    ),
    # Rat tibia micro-CT x8 (the R2-RCANGAN study): 10 -> 80 um voxels, low dose.
    "microct_x8": Preset(
        name="microct_x8",
        spacing_mm=(0.080, 0.080, 0.080),
        psf_fwhm_mm=(0.100, 0.100, 0.100),
        noise="poisson_gaussian",
        noise_hu=40.0,
        gain=2.0,
        description="low-dose micro-CT: 80 um voxels (x8 from 10 um), 0.1 mm FWHM, Poisson-Gaussian",
    ),
}


@dataclass
class Degraded:
    """Result of `degrade`: the LR image (HU) and what was done to make it."""

    image: tio.ScalarImage
    preset: Preset
    rigid: dict | None  # true misalignment: rotation (deg, about x, y, z), shift (mm), centre (mm)
    effective_fwhm_mm: tuple[float, float, float]
    noise_sd_hu: float

    def record(self) -> dict:
        return {
            "preset": asdict(self.preset),
            "rigid": self.rigid,
            "effective_fwhm_mm": list(self.effective_fwhm_mm),
            "noise_sd_hu": self.noise_sd_hu,
            "spacing_mm": [float(s) for s in self.image.spacing],
        }


KERNEL_CODE = ("fwhm_x_lr_vox", "fwhm_y_lr_vox", "fwhm_z_lr_vox", "noise_sd_window")


def kernel_code(record: dict, lr_range: Sequence[float]) -> list[float]:
    """The degradation of one LR scan as 4 numbers (`KERNEL_CODE`), the kernel code DAN's
    estimator learns to predict (Luo et al. 2020 use a 10-D PCA of 21x21 blur kernels; bone3d's
    PSFs are axis-aligned Gaussians, which their 3 FWHMs describe exactly):

    * the effective PSF FWHM along x, y, z in LR voxels (``effective_fwhm_mm / spacing_mm``);
    * the noise SD as a fraction of the LR intensity window ``lr_range`` (HU), the units the
      network sees.

    ``record`` is a `Degraded.record` (``degradation.json``).
    """
    fwhm = np.asarray(record["effective_fwhm_mm"], dtype=float)
    spacing = np.asarray(record["spacing_mm"], dtype=float)
    width = float(lr_range[1]) - float(lr_range[0])
    if fwhm.shape != (3,) or spacing.shape != (3,) or np.any(spacing <= 0) or width <= 0:
        raise InputError("degradation", "needs 3 FWHMs, 3 positive spacings and an LR window")
    return [*(fwhm / spacing).tolist(), float(record["noise_sd_hu"]) / width]


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise InputError("preset", f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def _box_weights(n_in: int, d_in: float, d_out: float) -> tuple[sparse.csr_matrix, int]:
    """Sparse (n_out, n_in) matrix of footprint-overlap fractions (rows sum to 1).

    Hand-written because no library resamples by exact area overlap for arbitrary, non-integer,
    per-axis ratios in physical units (torch 'area' pooling works on integer index windows).
    """
    n_out = int(math.floor(n_in * d_in / d_out + 1e-9))
    if n_out < 1:
        raise InputError("spacing", f"LR voxel {d_out} mm is larger than the whole field")
    rows, cols, vals = [], [], []
    for i in range(n_out):
        a, b = i * d_out, (i + 1) * d_out
        j0, j1 = int(math.floor(a / d_in)), min(n_in, int(math.ceil(b / d_in - 1e-9)))
        for j in range(j0, j1):
            overlap = min(b, (j + 1) * d_in) - max(a, j * d_in)
            if overlap > 0:
                rows.append(i)
                cols.append(j)
                vals.append(overlap / d_out)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in)), n_out


def area_resample(array: np.ndarray, in_spacing, out_spacing) -> np.ndarray:
    """Average ``array`` over output-voxel footprints (separable, exact overlaps), float32."""
    out = np.asarray(array, dtype=np.float32)
    for axis in range(3):
        w, _ = _box_weights(out.shape[axis], float(in_spacing[axis]), float(out_spacing[axis]))
        moved = np.moveaxis(out, axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        res = (w @ flat).astype(np.float32)
        out = np.moveaxis(res.reshape((w.shape[0],) + moved.shape[1:]), 0, axis)
    return np.ascontiguousarray(out)


def lr_affine(hr_affine: np.ndarray, hr_spacing, lr_spacing) -> np.ndarray:
    """Affine of the LR grid that starts where the HR grid starts (footprint-aligned)."""
    hr_affine = np.asarray(hr_affine, dtype=float)
    direction = hr_affine[:3, :3] / np.asarray(hr_spacing, dtype=float)
    shift = (np.asarray(lr_spacing, float) - np.asarray(hr_spacing, float)) / 2.0
    out = np.eye(4)
    out[:3, :3] = direction * np.asarray(lr_spacing, float)
    out[:3, 3] = hr_affine[:3, 3] + direction @ shift
    return out


def _rigid_resample(hu: np.ndarray, spacing, rng, max_rot_deg, max_shift_mm, fill):
    """Apply a random rigid transform about the volume centre (array space, mm units)."""
    angles = rng.uniform(-max_rot_deg, max_rot_deg, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    img = sitk.GetImageFromArray(np.transpose(hu, (2, 1, 0)))  # sitk wants (z, y, x)
    img.SetSpacing(tuple(float(s) for s in spacing))
    centre = [float((n - 1) * s / 2.0) for n, s in zip(hu.shape, spacing, strict=True)]
    tx = sitk.Euler3DTransform()
    tx.SetCenter(centre)
    tx.SetRotation(*np.deg2rad(angles).tolist())
    tx.SetTranslation(shift.tolist())
    out = sitk.Resample(img, img, tx, sitk.sitkLinear, float(fill), sitk.sitkFloat32)
    moved = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    record = {
        "rotation_deg": angles.tolist(),
        "shift_mm": shift.tolist(),
        "centre_mm": centre,
        "convention": "SimpleITK Euler3D in the HR array frame: maps LR-scan points to the "
        "original HR points (resampling transform)",
    }
    return np.ascontiguousarray(moved), record


def degrade(
    hr: tio.Image,
    preset: str | Preset = "mdct",
    *,
    seed: int = 0,
    misalign: bool = False,
    max_rotation_deg: float = 10.0,
    max_shift_mm: float = 2.0,
    intensity_map: tuple[float, float] | None = None,
    marrow_hu: float = 0.0,
    bone_hu: float = 1400.0,
    output_spacing_mm: tuple[float, float, float] | None = None,
) -> Degraded:
    """Simulate a low-resolution CT scan of ``hr``.

    Args:
        hr: HR volume (e.g. a phantom in mg HA/cm^3), ``(1, X, Y, Z)`` with spacing in mm.
        preset: a name in `PRESETS` or a `Preset`.
        seed: seeds noise and misalignment.
        misalign: apply a random rigid transform (rotations up to ``max_rotation_deg`` about each
            axis, shifts up to ``max_shift_mm``).
        intensity_map: ``(marrow_value, bone_value)`` in the input's units, mapped linearly to
            ``(marrow_hu, bone_hu)`` instead of the preset's HU calibration.
        output_spacing_mm: override the preset's LR spacing (e.g. the HR spacing to see the PSF
            alone).

    Returns:
        `Degraded` with the LR ``ScalarImage`` in HU (float32) and a record of the steps.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    check_image(hr, "hr")
    hr_sp = np.asarray(hr.spacing, dtype=float)
    lr_sp = np.asarray(output_spacing_mm if output_spacing_mm is not None else p.spacing_mm, float)
    if np.any(lr_sp < hr_sp * (1 - 1e-6)):
        raise InputError(
            "spacing", f"LR spacing {lr_sp.tolist()} mm is finer than HR {hr_sp.tolist()} mm"
        )
    arr = hr.data[0].numpy().astype(np.float32)
    if intensity_map is not None:
        lo, hi = (float(v) for v in intensity_map)
        if hi == lo:
            raise InputError("intensity_map", "marrow and bone values are equal")
        hu = marrow_hu + (arr - lo) * (bone_hu - marrow_hu) / (hi - lo)
    else:
        hu = p.hu_slope * arr + p.hu_intercept
    rng = np.random.default_rng(seed)
    rigid = None
    if misalign:
        hu, rigid = _rigid_resample(hu, hr_sp, rng, max_rotation_deg, max_shift_mm, marrow_hu)

    # PSF (and the anti-aliasing top-up where the PSF is narrower than one LR voxel)
    fwhm = np.asarray(p.psf_fwhm_mm, dtype=float)
    needs_aa = fwhm < lr_sp * (1 - 1e-9)
    fwhm_eff = np.where(needs_aa & (lr_sp > hr_sp * (1 + 1e-6)), lr_sp, fwhm)
    sigma_vox = fwhm_eff * FWHM_TO_SIGMA / hr_sp
    blurred = ndi.gaussian_filter(hu, sigma_vox, mode="nearest")

    lr = area_resample(blurred, hr_sp, lr_sp)

    contrast = bone_hu - marrow_hu if intensity_map is not None else p.hu_slope * 1000.0
    if p.noise == "none":
        sd = 0.0
    elif p.snr is not None:
        sd = abs(contrast) / p.snr
    else:
        sd = p.noise_hu
    if p.noise == "poisson_gaussian":
        var = p.gain * np.clip(lr - lr.min(), 0, None) + sd**2
        lr = lr + np.sqrt(var).astype(np.float32) * rng.standard_normal(lr.shape, dtype=np.float32)
    elif sd > 0:
        lr = lr + np.float32(sd) * rng.standard_normal(lr.shape, dtype=np.float32)

    affine = lr_affine(hr.affine, hr_sp, lr_sp)
    return Degraded(
        image=make_image(lr.astype(np.float32), affine=affine),
        preset=p,
        rigid=rigid,
        effective_fwhm_mm=tuple(float(f) for f in fwhm_eff),
        noise_sd_hu=float(sd),
    )


def hr_grid_for(lr: tio.Image, hr_spacing_mm) -> tuple[tuple[int, int, int], np.ndarray]:
    """The finer grid (shape, affine) at ``hr_spacing_mm`` inside ``lr``'s footprint.

    Both grids start at the same corner (the convention of `degrade`); the shape is the number of
    whole HR voxels that fit in the LR field, so for a non-integer spacing ratio the last partial
    HR voxel is dropped. This is the grid a model predicts on and the grid of the HR crop that
    pairs with ``lr`` (`crop_to_lr_field`).
    """
    hr_sp = np.asarray(hr_spacing_mm, dtype=float).reshape(-1)
    if hr_sp.size == 1:
        hr_sp = np.repeat(hr_sp, 3)
    if hr_sp.size != 3 or np.any(~np.isfinite(hr_sp)) or np.any(hr_sp <= 0):
        raise InputError("hr_spacing_mm", f"expected three positive numbers, got {hr_spacing_mm!r}")
    lr_sp = np.asarray(lr.spacing, dtype=float)
    shape = tuple(
        int(math.floor(n * a / b + 1e-6))
        for n, a, b in zip(lr.spatial_shape, lr_sp, hr_sp, strict=True)
    )
    direction = np.asarray(lr.affine)[:3, :3] / lr_sp
    affine = np.eye(4)
    affine[:3, :3] = direction * hr_sp
    affine[:3, 3] = np.asarray(lr.affine)[:3, 3] - direction @ ((lr_sp - hr_sp) / 2.0)
    return shape, affine


def crop_to_lr_field(hr: tio.Image, lr: tio.Image) -> tio.Image:
    """Crop ``hr`` to the whole HR voxels inside the field of ``lr`` (same starting corner).

    Raises `InputError` when the two grids do not start at the same corner (they were not made by
    `degrade` from this HR or registered onto it).
    """
    shape, affine = hr_grid_for(lr, hr.spacing)
    if not np.allclose(affine, hr.affine, atol=1e-4):
        raise InputError("lr", "LR and HR fields do not start at the same corner; register first")
    if any(a > b for a, b in zip(shape, hr.spatial_shape, strict=True)):
        raise InputError(
            "lr", f"LR field {shape} (HR voxels) exceeds the HR volume {hr.spatial_shape}"
        )
    data = hr.data[:, : shape[0], : shape[1], : shape[2]].clone()
    return type(hr)(tensor=data, affine=np.asarray(hr.affine))


@dataclass
class ScanPair:
    """Two independent scans of one specimen (`scan_pair`): what registration must undo.

    ``truth`` maps HR physical points to LR physical points (ITK/LPS millimetres), the same
    direction as the transform `bone3d.registration.register` returns (fixed = HR, moving = LR).
    """

    lr: tio.ScalarImage
    hr: tio.ScalarImage
    truth: sitk.Euler3DTransform
    degraded: Degraded

    def record(self) -> dict:
        return {
            **self.degraded.record(),
            "truth": {
                "rotation_deg": np.rad2deg(
                    [self.truth.GetAngleX(), self.truth.GetAngleY(), self.truth.GetAngleZ()]
                ).tolist(),
                "shift_mm": list(self.truth.GetTranslation()),
                "centre_mm": list(self.truth.GetCenter()),
                "convention": "ITK Euler3D (LPS mm), maps HR physical points to LR points",
            },
        }


def scan_pair(
    specimen: tio.Image,
    preset: str | Preset = "hrpqct",
    *,
    core_mm: float | Sequence[float],
    seed: int = 0,
    max_rotation_deg: float = 10.0,
    max_shift_mm: float = 2.0,
    intensity_map: tuple[float, float] | None = None,
) -> ScanPair:
    """Simulate an LR scan of a whole specimen and an HR scan of a core of it, in their own frames.

    The LR scanner images all of ``specimen`` (its frame is the specimen's); the HR scanner
    images a cube of side ``core_mm`` around the specimen centre, in a frame rotated (up to
    ``max_rotation_deg`` about each axis) and shifted (up to ``max_shift_mm`` per axis) by a
    random rigid transform ``T``: ``HR(p) = specimen(T(p))``. So the HR core lies inside the LR
    field, as in the vertebra and tibia studies, while the two headers disagree by ``T``.

    Args:
        specimen: HR-resolution volume of the whole specimen (mm spacing).
        preset: LR scanner model (see `PRESETS`).
        core_mm: side(s) of the HR field in mm.
        seed: seeds ``T`` and the LR noise.
        intensity_map: passed to `degrade`.
    """
    check_image(specimen, "specimen")
    src = specimen.as_sitk()
    size = np.asarray(src.GetSize())
    hr_sp = np.asarray(src.GetSpacing(), float)
    core = np.broadcast_to(np.asarray(core_mm, float), (3,))
    n = np.floor(core / hr_sp + 1e-6).astype(int)
    if np.any(n < 8) or np.any(n > size):
        raise InputError("core_mm", f"core of {n.tolist()} voxels does not fit {size.tolist()}")
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    centre = np.asarray(src.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    truth = sitk.Euler3DTransform()
    truth.SetCenter(centre.tolist())
    truth.SetRotation(*np.deg2rad(angles).tolist())
    truth.SetTranslation(shift.tolist())
    # the HR grid centre q maps to the specimen centre: R (q - c) + c + t = c
    rot = np.asarray(truth.GetMatrix()).reshape(3, 3)
    q = centre - rot.T @ shift
    direction = np.asarray(src.GetDirection()).reshape(3, 3)
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetSpacing(hr_sp.tolist())
    ref.SetDirection(src.GetDirection())
    ref.SetOrigin((q - direction @ ((n - 1) / 2.0 * hr_sp)).tolist())
    src = sitk.Cast(src, sitk.sitkFloat32)
    hr = sitk.Resample(src, ref, truth, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    d = degrade(specimen, preset, seed=seed, intensity_map=intensity_map)
    return ScanPair(lr=d.image, hr=tio.ScalarImage.from_sitk(hr), truth=truth, degraded=d)
