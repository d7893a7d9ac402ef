"""bone3d.io: round trips keep data, spacing and orientation; bad input gives one clear error."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from bone3d.errors import InputError
from bone3d.io import make_image, read_volume, write_volume


def _oblique_affine(spacing=(0.05, 0.06, 0.1)):
    """A rotated, flipped, anisotropic affine (RAS), to catch orientation mix-ups."""
    angle = np.deg2rad(20)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(spacing)
    affine[:3, 3] = [12.5, -3.25, 40.0]
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_round_trip_keeps_data_spacing_orientation(tmp_path, rng, suffix):
    data = rng.normal(size=(9, 7, 5)).astype(np.float32)
    img = make_image(data, affine=_oblique_affine())
    path = write_volume(img, tmp_path / f"vol{suffix}")
    back = read_volume(path)
    np.testing.assert_allclose(back.data[0].numpy(), data, rtol=1e-6)
    np.testing.assert_allclose(back.spacing, (0.05, 0.06, 0.1), rtol=1e-5)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_mhd_header_and_raw(tmp_path, rng):
    data = rng.integers(0, 255, size=(6, 5, 4)).astype(np.uint8)
    sitk_img = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)))
    sitk_img.SetSpacing((0.02, 0.03, 0.04))
    sitk_img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(sitk_img, str(tmp_path / "v.mhd"))
    back = read_volume(tmp_path / "v.mhd")
    np.testing.assert_array_equal(back.data[0].numpy(), data)
    np.testing.assert_allclose(back.spacing, (0.02, 0.03, 0.04), rtol=1e-6)
    # ITK stores LPS; TorchIO reports RAS: x and y flip sign
    np.testing.assert_allclose(back.affine[:3, 3], (-1.0, -2.0, 3.0))


def _write_dicom_series(folder, data_zyx, spacing, origin):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(data_zyx.shape[0]):
        sl = sitk.GetImageFromArray(data_zyx[k : k + 1].astype(np.int16))
        sl.SetSpacing(spacing)
        pos = (origin[0], origin[1], origin[2] + k * spacing[2])
        sl.SetOrigin(pos)
        tags = {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.41",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
            "0018|0050": f"{spacing[2]:.4f}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(tmp_path, rng):
    data = rng.integers(-500, 1500, size=(6, 8, 10)).astype(np.int16)  # (z, y, x)
    _write_dicom_series(tmp_path / "series", data, (0.2, 0.25, 0.6), (10.0, 20.0, -30.0))
    img = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(img.data[0].numpy(), np.transpose(data, (2, 1, 0)))
    np.testing.assert_allclose(img.spacing, (0.2, 0.25, 0.6), rtol=1e-4)
    np.testing.assert_allclose(img.affine[:3, 3], (-10.0, -20.0, -30.0), atol=1e-3)


def test_tiff_stack_file_and_folder(tmp_path, rng):
    data = rng.integers(0, 255, size=(5, 6, 7)).astype(np.uint8)  # (z, y, x) pages
    tifffile.imwrite(tmp_path / "stack.tif", data)
    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(data.shape[0]):
        tifffile.imwrite(folder / f"s{k:03d}.tif", data[k])
    for source in (tmp_path / "stack.tif", folder):
        img = read_volume(source, spacing=(0.01, 0.01, 0.02))
        np.testing.assert_array_equal(img.data[0].numpy(), np.transpose(data, (2, 1, 0)))
        np.testing.assert_allclose(img.spacing, (0.01, 0.01, 0.02))
        with pytest.raises(InputError, match="spacing"):
            read_volume(source)


# ---------------------------------------------------------------------------------------------
# bad input: one error type, naming the file
# ---------------------------------------------------------------------------------------------


def _nifti(path, data, zooms=(0.1, 0.1, 0.1)):
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


def _bad_inputs(tmp_path, rng):
    good = rng.normal(size=(6, 6, 6)).astype(np.float32)
    cases = {}
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(gzip.compress(os.urandom(500)))
    cases["corrupt"] = (p, "cannot read")
    full = _nifti(tmp_path / "full.nii", good)
    t = tmp_path / "truncated.nii"
    t.write_bytes(full.read_bytes()[:500])
    cases["truncated"] = (t, "cannot read")
    cases["2d"] = (_nifti(tmp_path / "flat.nii.gz", good[:, :, 0]), "3D")
    cases["multichannel"] = (
        _nifti(tmp_path / "vec.nii.gz", rng.normal(size=(6, 6, 6, 3)).astype(np.float32)),
        "channel",
    )
    nan = good.copy()
    nan[1, 2, 3] = np.nan
    cases["nan"] = (_nifti(tmp_path / "nan.nii.gz", nan), "NaN")
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    cases["inf"] = (_nifti(tmp_path / "inf.nii.gz", inf), "infinite")
    zero = _nifti(tmp_path / "zero.nii", good)
    raw = bytearray(zero.read_bytes())  # NIfTI-1 header: pixdim at byte 76, q/sform codes at 252
    raw[84:88] = np.float32(0.0).tobytes()  # pixdim[2] = 0
    raw[252:256] = bytes(4)  # qform_code = sform_code = 0: spacing comes from pixdim alone
    zero.write_bytes(bytes(raw))
    cases["zero_spacing"] = (zero, "spacing")
    nrrd = tmp_path / "nospacing.nrrd"
    nrrd.write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n" + bytes(64)
    )
    cases["missing_spacing"] = (nrrd, "no voxel spacing")
    cases["empty"] = (_nifti(tmp_path / "empty.nii.gz", np.zeros((0, 4, 4), np.float32)), "")
    cases["missing"] = (tmp_path / "absent.nii.gz", "no such file")
    cases["unsupported"] = (tmp_path / "notes.txt", "")
    (tmp_path / "notes.txt").write_text("hello")
    return cases


def test_every_bad_input_raises_input_error_naming_the_file(tmp_path, rng):
    for name, (path, words) in _bad_inputs(tmp_path, rng).items():
        with pytest.raises(InputError) as info:
            read_volume(path)
        assert str(path.name) in str(info.value), name
        assert words in str(info.value), (name, str(info.value))


def test_cli_bad_input_exits_2_with_one_line(tmp_path, rng):
    cases = _bad_inputs(tmp_path, rng)
    for name in ("corrupt", "nan", "zero_spacing", "2d", "missing_spacing"):
        path, _ = cases[name]
        before = path.read_bytes()
        out = tmp_path / f"lr_{name}.nii.gz"
        res = subprocess.run(
            [sys.executable, "-m", "bone3d.cli", "simulate", str(path), "-o", str(out)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 2, (name, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln]
        assert len(lines) == 1 and path.name in lines[0], (name, res.stderr)
        assert "Traceback" not in res.stderr
        assert not out.exists()
        assert path.read_bytes() == before, "input was modified"


def test_write_refuses_to_overwrite_an_input(tmp_path, rng):
    src = write_volume(
        make_image(rng.normal(size=(5, 5, 5)).astype(np.float32), spacing=(1, 1, 1)),
        tmp_path / "in.nii.gz",
    )
    before = src.read_bytes()
    img = read_volume(src)
    with pytest.raises(InputError, match="overwrite an input"):
        write_volume(img, src)
    assert src.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path, rng):
    img = make_image(rng.normal(size=(5, 5, 5)).astype(np.float32), spacing=(1, 1, 1))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # running as root: simulate with a file in place of the folder
            target = tmp_path / "afile" / "x.nii.gz"
            (tmp_path / "afile").write_text("not a folder")
        else:
            target = ro / "x.nii.gz"
        with pytest.raises(InputError, match="cannot write"):
            write_volume(img, target)
        assert not target.exists()
    finally:
        ro.chmod(0o755)
    with pytest.raises(InputError, match="cannot write"):
        write_volume(img, tmp_path / "x.png")


def test_make_image_rejects_bad_spacing(rng):
    with pytest.raises(InputError, match="spacing"):
        make_image(np.zeros((3, 3, 3), np.float32), spacing=(1, 0, 1))


def test_atomic_path_leaves_target_untouched_on_failure(tmp_path):
    import pytest

    from bone3d.io import atomic_path, write_csv, write_text

    target = write_text("old", tmp_path / "a.txt")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary left behind
    out = write_csv([{"a": 1, "b": 2}], tmp_path / "t.csv")
    assert out.read_text().splitlines() == ["a,b", "1,2"]
