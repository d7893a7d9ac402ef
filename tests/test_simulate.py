"""bone3d.data.simulate: the CT degradation model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bone3d.data.phantom import make_phantom
from bone3d.data.simulate import (
    PRESETS,
    area_resample,
    crop_to_lr_field,
    degrade,
    get_preset,
    hr_grid_for,
)
from bone3d.errors import InputError
from bone3d.io import make_image


def _measured_fwhm(profile: np.ndarray, step_mm: float) -> float:
    """FWHM of the line spread function = derivative of an edge spread function."""
    lsf = np.gradient(profile.astype(float))
    half = lsf.max() / 2
    above = np.nonzero(lsf >= half)[0]
    i0, i1 = above[0], above[-1]
    left = i0 - 1 + (half - lsf[i0 - 1]) / (lsf[i0] - lsf[i0 - 1])
    right = i1 + (lsf[i1] - half) / (lsf[i1] - lsf[i1 + 1])
    return (right - left) * step_mm


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_psf_fwhm_measured_on_an_edge_is_within_10_percent(name):
    p = replace(get_preset(name), noise="none")
    fwhm = np.asarray(p.psf_fwhm_mm)
    step = float(fwhm.min()) / 12  # fine sampling of the edge
    n = int(np.ceil(6 * fwhm.max() / step)) * 2
    for axis in range(3):
        shape = [8, 8, 8]
        shape[axis] = n
        arr = np.zeros(shape, np.float32)
        idx = [slice(None)] * 3
        idx[axis] = slice(n // 2, None)
        arr[tuple(idx)] = 1000.0
        out = degrade(make_image(arr, spacing=(step,) * 3), p, output_spacing_mm=(step,) * 3)
        prof = np.moveaxis(out.image.data[0].numpy(), axis, 0)[:, 4, 4]
        measured = _measured_fwhm(prof, step)
        assert abs(measured - fwhm[axis]) <= 0.10 * fwhm[axis], (name, axis, measured)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_spacing_and_affine(name):
    p = get_preset(name)
    hr_sp = min(p.spacing_mm) / 4
    hr = make_image(np.zeros((64, 64, 64), np.float32), spacing=(hr_sp,) * 3)
    lr = degrade(hr, p).image
    np.testing.assert_allclose(lr.spacing, p.spacing_mm, rtol=1e-6)
    # footprint-aligned: LR voxel 0 starts where HR voxel 0 starts
    np.testing.assert_allclose(
        lr.affine[:3, 3] - np.asarray(p.spacing_mm) / 2, hr.affine[:3, 3] - hr_sp / 2, atol=1e-9
    )
    expected = [int(np.floor(64 * hr_sp / s + 1e-9)) for s in p.spacing_mm]
    assert list(lr.spatial_shape) == expected


def test_noise_level_and_calibration():
    hr = make_image(np.full((40, 40, 40), 500.0, np.float32), spacing=(0.05,) * 3)
    p = replace(get_preset("hrpqct"), snr=None, noise_hu=25.0)
    lr = degrade(hr, p, seed=3).image.data[0].numpy()
    assert abs(lr.mean() - 1.4 * 500.0) < 3.0  # HU = 1.4 * mg HA/cm^3
    assert abs(lr.std() - 25.0) < 1.5
    again = degrade(hr, p, seed=3).image.data[0].numpy()
    np.testing.assert_array_equal(lr, again)


def test_area_resample_conserves_mean_for_non_integer_ratios(rng):
    arr = rng.random((50, 37, 41)).astype(np.float32)
    out = area_resample(arr, (0.05, 0.05, 0.05), (0.13, 0.11, 0.2))
    assert out.shape == (19, 16, 10)
    covered = arr[: int(19 * 0.13 / 0.05), : int(16 * 0.11 / 0.05), : int(10 * 0.2 / 0.05)]
    assert abs(out.mean() - covered.mean()) < 0.01


def test_misalignment_is_recorded_and_bounded():
    ph = make_phantom(shape=(48, 48, 48), seed=0)
    d = degrade(ph.image, "hrpqct", seed=5, misalign=True, max_rotation_deg=10, max_shift_mm=2)
    assert d.rigid is not None
    assert all(abs(a) <= 10 for a in d.rigid["rotation_deg"])
    assert all(abs(s) <= 2 for s in d.rigid["shift_mm"])
    aligned = degrade(ph.image, "hrpqct", seed=5).image.data[0].numpy()
    assert np.abs(d.image.data[0].numpy() - aligned).mean() > 10.0


def test_hr_grid_and_crop_pair_up_with_the_lr_field():
    ph = make_phantom(shape=(96, 96, 96), seed=0)
    lr = degrade(ph.image, "mdct", seed=0).image  # non-integer in-plane ratio 0.195 / 0.05
    shape, affine = hr_grid_for(lr, ph.image.spacing)
    hr = crop_to_lr_field(ph.image, lr)
    assert hr.spatial_shape == shape == (93, 93, 96)
    np.testing.assert_allclose(hr.affine, affine, atol=1e-9)
    moved = np.array(ph.image.affine)
    moved[0, 3] += 1.0  # an HR volume 1 mm off: not the LR's field of view
    with pytest.raises(InputError, match="same corner"):
        crop_to_lr_field(make_image(ph.image.data[0].numpy(), affine=moved), lr)


def test_lr_finer_than_hr_is_refused():
    hr = make_image(np.zeros((16, 16, 16), np.float32), spacing=(0.5, 0.5, 0.5))
    with pytest.raises(InputError, match="finer"):
        degrade(hr, "hrpqct")


def test_phantom_and_simulate_cli(tmp_path):
    import json
    import subprocess
    import sys

    from bone3d.io import read_volume

    hr, lr = tmp_path / "hr.nii.gz", tmp_path / "lr.nii.gz"
    cmd = [sys.executable, "-m", "bone3d.cli"]
    res = subprocess.run(
        [*cmd, "phantom", "-o", str(hr), "--shape", "40", "40", "40", "--seed", "3"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    lost = tmp_path / "lost.nii.gz"
    res = subprocess.run(
        [*cmd, "phantom", "-o", str(lost), "--shape", "40", "40", "40", "--seed", "3",
         "--perforation", "0.5"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "BV/TV 0.075" in res.stdout  # half of the default 0.15 cut away
    res = subprocess.run(
        [*cmd, "phantom", "-o", str(tmp_path / "x.nii.gz"), "--perforation", "1.2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "perforation" in res.stderr
    assert not (tmp_path / "x.nii.gz").exists()
    res = subprocess.run(
        [*cmd, "simulate", str(hr), "--preset", "mdct", "-o", str(lr), "--misalign"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    img = read_volume(lr)
    np.testing.assert_allclose(img.spacing, PRESETS["mdct"].spacing_mm, rtol=1e-6)
    record = json.loads((tmp_path / "lr.degradation.json").read_text())
    assert record["preset"]["name"] == "mdct" and len(record["rigid"]["rotation_deg"]) == 3
    before = hr.read_bytes()
    res = subprocess.run([*cmd, "simulate", str(hr), "-o", str(hr)], capture_output=True, text=True)
    assert res.returncode == 2 and "overwrite an input" in res.stderr
    assert hr.read_bytes() == before
