"""Registration against known truth: simulated independent LR/HR scans (`scan_pair`)."""

from __future__ import annotations

import json

import ants
import numpy as np
import pytest
import SimpleITK as sitk
import torchio as tio
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from bone3d.data.phantom import make_phantom
from bone3d.data.prepare import two_class_means
from bone3d.data.simulate import crop_to_lr_field, scan_pair
from bone3d.errors import InputError
from bone3d.io import read_volume
from bone3d.registration import volume
from bone3d.registration.pairing import largest_covered_box, register_pair
from bone3d.registration.qa import coverage_mask, similarity
from bone3d.registration.validate import summary, tre_trials
from bone3d.registration.volume import register, target_registration_error

BOUNDS = {"hrpqct": 0.1, "mdct": 0.25}  # LR voxels, from the acceptance list
LHDL = "lhdl_human_trabecular_uct/LHDL_3155_D_4_bc_200cube_19p5um.nii.gz"


@pytest.fixture(scope="module")
def specimen():
    """A 6.4 mm phantom specimen at 40 um; the HR core is its central 3.2 mm."""
    return make_phantom(shape=(160, 160, 160), spacing_mm=0.04, tb_th_mm=0.12, seed=1).image


def _check_trials(records, preset, record_property):
    s = summary(records, BOUNDS[preset])
    record_property(f"median_tre_lr_vox_{preset}", s["median_tre_lr_vox"])
    tre = [round(r["tre_lr_vox"], 3) for r in records]
    print(f"{preset}: median TRE {s['median_tre_lr_vox']:.3f} LR voxels, all {tre}")
    assert s["trials"] == 20
    assert s["under_bound"] >= 19, (s, tre)
    # the trials really were displaced by up to 10 degrees and 2 mm
    assert max(max(abs(a) for a in r["rotation_deg"]) for r in records) > 7.0
    assert max(max(abs(a) for a in r["shift_mm"]) for r in records) > 1.5


@pytest.mark.parametrize("preset", ["hrpqct", "mdct"])
def test_tre_on_phantom_within_bound_in_19_of_20_trials(specimen, preset, record_property):
    _check_trials(list(tre_trials(specimen, preset, core_mm=3.2, n=20)), preset, record_property)


@pytest.mark.realdata
@pytest.mark.parametrize("preset", ["hrpqct", "mdct"])
def test_tre_on_lhdl_micro_ct_within_bound_in_19_of_20_trials(shared_data, preset, record_property):
    spec = read_volume(shared_data / LHDL)
    im = two_class_means(spec.data[0].numpy().astype(np.float32))
    records = list(tre_trials(spec, preset, core_mm=1.95, n=20, intensity_map=im))
    _check_trials(records, preset, record_property)


def test_same_seed_gives_the_same_transform_and_tre_is_zero_for_the_truth(specimen):
    pair = scan_pair(specimen, "hrpqct", core_mm=2.0, seed=5)
    a = register(pair.hr, pair.lr, seed=3)
    b = register(pair.hr, pair.lr, seed=3)
    assert np.array_equal(a.transform.parameters, b.transform.parameters)

    # against an identity "truth" the same result is off by the simulated displacement (mm)
    ident = sitk.Euler3DTransform()
    err = target_registration_error(a, ident, pair.hr, pair.lr.spacing)["tre_mm"]
    assert err > 0.3


def test_affine_registration_recovers_a_rigid_motion(specimen):
    pair = scan_pair(specimen, "hrpqct", core_mm=3.2, seed=11)
    reg = register(pair.hr, pair.lr, type="affine", seed=0)
    assert reg.stages == ["rigid", "affine"]
    assert abs(reg.record()["determinant"] - 1.0) < 0.02
    assert target_registration_error(reg, pair.truth, pair.hr, pair.lr.spacing)["tre_lr_vox"] < 0.2


def test_register_pair_writes_aligned_outputs(specimen, tmp_path):
    pair = scan_pair(specimen, "hrpqct", core_mm=3.2, seed=2)
    rec = register_pair(pair.hr, pair.lr, tmp_path / "p", name="s1")
    assert rec["accepted"], rec["reasons"]
    for name in (
        "transform.mat",
        "lr.nii.gz",
        "lr_hrgrid.nii.gz",
        "hr.nii.gz",
        "qa.json",
        "qa.png",
    ):
        assert (tmp_path / "p" / name).is_file()
    qa = json.loads((tmp_path / "p" / "qa.json").read_text())
    assert qa["similarity_after"]["ncc"] > 0.9 > qa["similarity_before"]["ncc"]
    assert qa["hr_covered_fraction"] == 1.0
    lr = read_volume(tmp_path / "p" / "lr.nii.gz")
    hr = read_volume(tmp_path / "p" / "hr.nii.gz")
    lr_hr = read_volume(tmp_path / "p" / "lr_hrgrid.nii.gz")
    # LR at LR spacing in the HR frame; the HR crop is a whole number of LR voxels on that grid
    assert np.allclose(lr.spacing, pair.lr.spacing, rtol=1e-5)
    assert crop_to_lr_field(hr, lr).spatial_shape == hr.spatial_shape
    assert lr_hr.spatial_shape == hr.spatial_shape and np.allclose(lr_hr.affine, hr.affine)
    # registered LR agrees with the HR content voxel by voxel (after the LR blur)
    r = np.corrcoef(lr_hr.data.numpy().ravel(), hr.data.numpy().ravel())[0, 1]
    assert r > 0.6
    # written slab by slab, it is the whole-grid resampling through the stored transform
    stored = ants.read_transform(str(tmp_path / "p" / "transform.mat"))
    whole = stored.apply_to_image(volume.to_ants(pair.lr), volume.to_ants(hr), "bspline").numpy()
    assert np.abs(lr_hr.data.numpy()[0] - whole).max() < 1e-4 * np.abs(whole).max()
    # the transform file reads back in SimpleITK and maps like the record says
    tx = sitk.ReadTransform(str(tmp_path / "p" / "transform.mat"))
    p0 = [0.1, -0.2, 0.3]
    m = np.asarray(rec["registration"]["matrix"])
    c = np.asarray(rec["registration"]["centre_mm"])
    t = np.asarray(rec["registration"]["translation_mm"])
    assert np.allclose(tx.TransformPoint(p0), m @ (np.asarray(p0) - c) + c + t, atol=1e-6)


def test_mask_restricts_the_metric_and_bad_masks_are_refused(specimen):
    pair = scan_pair(specimen, "hrpqct", core_mm=3.2, seed=8)
    m = np.zeros((1, *pair.hr.spatial_shape), np.uint8)
    m[:, 10:70, 10:70, 10:70] = 1  # e.g. the cylindrical field of a scanner, here a box
    mask = tio.LabelMap(tensor=m, affine=pair.hr.affine)
    reg = register(pair.hr, pair.lr, mask=mask, seed=0)
    assert target_registration_error(reg, pair.truth, pair.hr, pair.lr.spacing)["tre_lr_vox"] < 0.1
    with pytest.raises(InputError, match="empty mask"):
        register(pair.hr, pair.lr, mask=tio.LabelMap(tensor=0 * m, affine=pair.hr.affine))
    with pytest.raises(InputError, match="not on the HR grid"):
        register(pair.hr, pair.lr, mask=tio.LabelMap(tensor=m[:, :40], affine=pair.hr.affine))


def test_largest_covered_box_is_fully_covered():
    covered = np.zeros((30, 30, 30), bool)
    covered[3:25, 5:28, 2:20] = True
    covered[3, 5, 2] = False  # a missing corner forces a shrink
    box = largest_covered_box(covered)
    assert covered[box].all()
    assert covered[box].size >= 21 * 23 * 18


# ------------------------------------------------------------------------------------------------
# bad input: a clear error or a flagged pair, never a silent bad pair
# ------------------------------------------------------------------------------------------------


def test_blank_volume_is_refused(specimen):
    pair = scan_pair(specimen, "hrpqct", core_mm=2.0, seed=1)
    blank = tio.ScalarImage(tensor=np.zeros((1, 20, 20, 20), np.float32), affine=pair.lr.affine)
    with pytest.raises(InputError, match="blank"):
        register(pair.hr, blank)


def test_wildly_wrong_spacing_is_refused(specimen):
    pair = scan_pair(specimen, "hrpqct", core_mm=2.0, seed=1)
    wrong = tio.ScalarImage(tensor=pair.lr.data, affine=np.diag([0.008, 0.008, 0.008, 1.0]))
    with pytest.raises(InputError, match="finer than HR"):
        register_pair(pair.hr, wrong, "/nonexistent/never-written")


def test_scans_of_different_specimens_are_flagged(specimen, tmp_path):
    other = make_phantom(shape=(160, 160, 160), spacing_mm=0.04, tb_th_mm=0.12, seed=99).image
    pair = scan_pair(specimen, "hrpqct", core_mm=3.2, seed=4)
    lr_other = scan_pair(other, "hrpqct", core_mm=3.2, seed=4).lr
    rec = register_pair(pair.hr, lr_other, tmp_path / "bad", name="mismatch")
    assert not rec["accepted"]
    assert any("correlation" in r for r in rec["reasons"])
    saved = json.loads((tmp_path / "bad" / "qa.json").read_text())
    assert saved["accepted"] is False and saved["reasons"] == rec["reasons"]


def test_non_overlapping_fields_are_flagged(specimen, tmp_path):
    """An HR core whose content lies outside the LR field cannot become a pair."""
    pair = scan_pair(specimen, "hrpqct", core_mm=3.2, seed=4)
    lr = pair.lr.data[0].numpy()
    small = lr[: lr.shape[0] // 4]  # LR field cut to a slab beside the core
    lr_cut = tio.ScalarImage(tensor=small[None].copy(), affine=pair.lr.affine)
    rec = register_pair(pair.hr, lr_cut, tmp_path / "cut", name="cut")
    assert not rec["accepted"]
    assert rec["reasons"]


# ------------------------------------------------------------------------------------------------
# CLI: one pair, and many pairs into a datalist
# ------------------------------------------------------------------------------------------------


def _write_scans(specimen, folder, seed, lr_from=None):
    from bone3d.io import write_volume

    pair = scan_pair(specimen, "hrpqct", core_mm=3.2, seed=seed)
    lr = pair.lr if lr_from is None else scan_pair(lr_from, "hrpqct", core_mm=3.2, seed=seed).lr
    return write_volume(lr, folder / f"lr{seed}.nii.gz"), write_volume(
        pair.hr, folder / f"hr{seed}.nii.gz"
    )


def test_cli_register_one_pair(specimen, tmp_path, capsys):
    from bone3d.cli import main

    lr, hr = _write_scans(specimen, tmp_path, 7)
    before = lr.read_bytes(), hr.read_bytes()
    assert main(["register", "--lr", str(lr), "--hr", str(hr), "-o", str(tmp_path / "out")]) == 0
    assert "NCC" in capsys.readouterr().out
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert qa["accepted"] and qa["registration"]["type"] == "rigid"
    assert (lr.read_bytes(), hr.read_bytes()) == before  # inputs untouched


def test_cli_register_pairs_writes_datalist_and_leaves_flagged_out(specimen, tmp_path, capsys):
    from bone3d.cli import main

    other = make_phantom(shape=(160, 160, 160), spacing_mm=0.04, tb_th_mm=0.12, seed=42).image
    rows = ["specimen,lr,hr"]
    for seed in (1, 2, 3):
        lr, hr = _write_scans(specimen, tmp_path, seed)
        rows.append(f"s{seed},{lr.name},{hr.name}")
    lr, hr = _write_scans(specimen, tmp_path, 4, lr_from=other)  # LR of another specimen
    rows.append(f"bad,{lr.name},{hr.name}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "dataset"
    code = main(["register", "--pairs", str(tmp_path / "pairs.csv"), "-o", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "flagged bad" in err
    data = json.loads((out / "datalist.json").read_text())
    listed = [it["specimen"] for k in ("training", "validation", "test") for it in data[k]]
    assert sorted(listed) == ["s1", "s2", "s3"]
    assert list(data["registration"]["flagged"]) == ["bad"]
    from bone3d.data.datalist import datalist_items

    item = datalist_items(out / "datalist.json", "training")[0]
    lr_img, hr_img = read_volume(item["image"]), read_volume(item["target"])
    assert crop_to_lr_field(hr_img, lr_img).spatial_shape == hr_img.spatial_shape


# ------------------------------------------------------------------------------------------------
# memory: the whole-volume steps run slab by slab and give the whole-volume values
# ------------------------------------------------------------------------------------------------


def _grey(shape, spacing, seed=0):
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    arr = gaussian_filter(arr, 1.5)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (1.0, -2.0, 3.0)
    return tio.ScalarImage(tensor=arr[None], affine=affine)


def test_slab_wise_smoothing_is_the_whole_volume_gaussian_and_finite_for_wide_kernels(
    monkeypatch,
):
    img = _grey((24, 20, 50), (0.05, 0.05, 0.07))
    monkeypatch.setattr(volume, "SLAB_VOXELS", 24 * 20 * 6)  # 9 z slabs, 3 x slabs
    arr = img.data[0].numpy()
    out = volume.smooth(img, [0.1, 0.2, 0.5])
    ref = gaussian_filter(arr, [2.0, 4.0, 0.5 / 0.07], mode="nearest", truncate=4.0)
    assert np.array_equal(out, ref)
    # a 0.6 mm CT slice over 20 um voxels is a sigma of 30 voxels, where ITK's discrete Gaussian
    # (ants.smooth_image) returns NaN; this one blurs
    wide = volume.smooth(img, [0.0, 0.0, 30 * 0.07])
    assert np.isfinite(wide).all()
    assert np.array_equal(wide, gaussian_filter1d(arr, 30.0, axis=2, mode="nearest"))
    assert wide.std(axis=2).mean() < 0.3 * arr.std(axis=2).mean()


@pytest.mark.parametrize("interpolation", ["linear", "bspline"])
def test_resampling_box_by_box_equals_ants_on_the_whole_grid(interpolation, monkeypatch):
    hr = _grey((40, 36, 30), (0.04, 0.04, 0.04), seed=1)
    lr = _grey((18, 17, 16), (0.1, 0.1, 0.1), seed=2)
    tx = ants.new_ants_transform(dimension=3, transform_type="AffineTransform")
    c, s = np.cos(0.1), np.sin(0.1)
    tx.set_parameters([c, -s, 0, s, c, 0, 0, 0, 1, 0.05, -0.1, 0.08])
    whole = tx.apply_to_image(volume.to_ants(lr), volume.to_ants(hr), interpolation).numpy()
    assert 0 < (whole == 0).mean() < 0.5  # part of the HR grid lies outside the LR field
    monkeypatch.setattr(volume, "SLAB_VOXELS", 40 * 36 * 4)
    moving = volume.to_ants(lr)
    parts = [
        volume.resample(moving, tx, hr.spatial_shape, hr.affine, (slice(0, 40), slice(0, 36), slice(a, b)), interpolation)
        for a, b in volume.z_slabs(hr.spatial_shape)
    ]  # fmt: skip
    assert len(parts) == 8
    np.testing.assert_allclose(
        np.concatenate(parts, axis=2), whole, atol=1e-4 * np.abs(whole).max()
    )
    # and one plane, as the QA figure takes it
    plane = volume.resample(moving, tx, hr.spatial_shape, hr.affine, (slice(20, 21), slice(0, 36), slice(0, 30)), interpolation)  # fmt: skip
    np.testing.assert_allclose(plane[0], whole[20], atol=1e-4 * np.abs(whole).max())


def test_slab_wise_similarity_is_the_whole_volume_ncc_and_mutual_information(specimen, monkeypatch):
    from sklearn.metrics import mutual_info_score

    pair = scan_pair(specimen, "hrpqct", core_mm=2.0, seed=4)
    hr = pair.hr
    lr = tio.Crop((20, 0, 0, 0, 0, 0))(pair.lr)  # LR from x = 1.66 mm: about half the HR core
    # the whole-volume computation, written out
    inside = coverage_mask(hr, lr, None)
    assert 0.2 < inside.mean() < 1.0
    fixed = volume.smooth(hr, list(map(float, lr.spacing)))
    moved = ants.new_ants_transform(dimension=3).apply_to_image(
        volume.to_ants(lr), volume.to_ants(hr), "linear"
    )
    a, b = fixed[inside].astype(np.float64), moved.numpy()[inside].astype(np.float64)
    qa = [np.digitize(v, np.linspace(v.min(), v.max(), 33)[1:-1]) for v in (a, b)]
    monkeypatch.setattr(volume, "SLAB_VOXELS", hr.spatial_shape[0] * hr.spatial_shape[1] * 7)
    got = similarity(hr, lr, None)
    assert got["covered_fraction"] == pytest.approx(inside.mean())
    assert got["ncc"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-5)
    assert got["mi_nats"] == pytest.approx(mutual_info_score(*qa), abs=1e-3)
