"""Every CLI verb fed bad input: exit code 2, one line naming the problem, inputs untouched,
no partial output left behind."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bone3d.cli import main
from bone3d.io import make_image, write_volume

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "unet_sr"


def _digest(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def files(tmp_path, rng):
    good = rng.normal(500, 300, size=(24, 24, 24)).astype(np.float32)
    f = {"good": write_volume(make_image(good, spacing=(0.05,) * 3), tmp_path / "good.nii.gz")}
    f["corrupt"] = tmp_path / "corrupt.nii.gz"
    f["corrupt"].write_bytes(gzip.compress(os.urandom(400)))
    full = tmp_path / "full.nii"
    nib.save(nib.Nifti1Image(good, np.diag([0.05, 0.05, 0.05, 1])), str(full))
    f["truncated"] = tmp_path / "truncated.nii"
    f["truncated"].write_bytes(full.read_bytes()[:1000])
    f["flat"] = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(good[:, :, 0], np.eye(4)), str(f["flat"]))
    nan = good.copy()
    nan[3, 3, 3] = np.nan
    f["nan"] = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(nan, np.diag([0.05, 0.05, 0.05, 1])), str(f["nan"]))
    zero = tmp_path / "zero.nii"
    raw = bytearray(full.read_bytes())
    raw[84:88] = np.float32(0).tobytes()
    raw[252:256] = bytes(4)
    zero.write_bytes(bytes(raw))
    f["zero_spacing"] = zero
    f["folder"] = tmp_path / "a_folder"
    f["folder"].mkdir()
    f["empty_mask"] = write_volume(
        make_image(np.zeros((24, 24, 24), np.uint8), spacing=(0.05,) * 3, label=True),
        tmp_path / "empty_mask.nii.gz",
    )
    f["grey_mask"] = write_volume(
        make_image(np.arange(24**3, dtype=np.float32).reshape(24, 24, 24), spacing=(0.05,) * 3),
        tmp_path / "grey_mask.nii.gz",
    )
    f["small_mask"] = write_volume(
        make_image(np.ones((10, 10, 10), np.uint8), spacing=(0.05,) * 3, label=True),
        tmp_path / "small_mask.nii.gz",
    )
    f["a_file"] = tmp_path / "not_a_folder"
    f["a_file"].write_text("x")
    return f


def _check(capsys, argv, inputs, outputs, words):
    before = _digest(inputs)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and words in lines[0], (argv, err)
    assert "Traceback" not in err
    assert _digest(inputs) == before, "an input was modified"
    for out in outputs:
        out = Path(out)
        assert not out.exists(), f"partial output {out}"
        if out.parent.is_dir():
            assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], (
                "temp file left"
            )
    return err


@pytest.mark.parametrize(
    "bad, words",
    [("corrupt", "cannot read"), ("truncated", "cannot read"), ("flat", "3D"), ("nan", "NaN"),
     ("zero_spacing", "spacing"), ("folder", "DICOM"), ("missing", "no such file")],
)  # fmt: skip
def test_simulate_rejects(files, tmp_path, capsys, bad, words):
    src = files.get(bad, tmp_path / "missing.nii.gz")
    out = tmp_path / "out" / "lr.nii.gz"
    _check(capsys, ["simulate", str(src), "-o", str(out)], [src], [out], words)


def test_simulate_into_an_unwritable_place(files, tmp_path, capsys):
    out = files["a_file"] / "lr.nii.gz"  # a file where the output folder should be
    _check(
        capsys,
        ["simulate", str(files["good"]), "-o", str(out)],
        [files["good"]],
        [out],
        "cannot write",
    )


@pytest.mark.parametrize(
    "mask, words", [("empty_mask", "empty"), ("grey_mask", "not binary"), ("small_mask", "differs")]
)
def test_morpho_rejects_bad_masks(files, tmp_path, capsys, mask, words):
    out = tmp_path / "m.json"
    _check(
        capsys,
        ["morpho", str(files["good"]), "--mask", str(files[mask]), "--json", str(out)],
        [files["good"], files[mask]],
        [out],
        words,
    )


@pytest.mark.parametrize(
    "bad, words", [("nan", "NaN"), ("corrupt", "cannot read"), ("folder", "DICOM")]
)
def test_morpho_rejects_bad_volumes(files, tmp_path, capsys, bad, words):
    out = tmp_path / "m.json"
    _check(capsys, ["morpho", str(files[bad]), "--json", str(out)], [files[bad]], [out], words)


@pytest.mark.parametrize(
    "verb, words",
    [("morpho", "a number or density:MGHA"), ("evaluate", "('isodata', 'otsu') or a number")],
)
def test_unknown_threshold_names_what_each_verb_accepts(files, tmp_path, capsys, verb, words):
    """``morpho`` also takes a calibrated ``density:MGHA``; ``evaluate`` does not, and must not
    suggest it."""
    out = tmp_path / "o"
    src = str(files["good"])
    argv = {
        "morpho": ["morpho", src, "--threshold", "isodat", "--json", str(out)],
        "evaluate": [
            "evaluate",
            "--pred",
            src,
            "--hr",
            src,
            "--threshold",
            "isodat",
            "-o",
            str(out),
        ],
    }[verb]
    err = _check(capsys, argv, [files["good"]], [out], words)
    assert ("density" in err) == (verb == "morpho")


def test_morpho_cylinder_outside_the_image(files, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = [
        "morpho",
        str(files["good"]),
        "--cylinder",
        "0.5",
        "0.5",
        "--centre",
        "50",
        "50",
        "50",
        "--json",
        str(out),
    ]
    _check(capsys, argv, [files["good"]], [out], "no voxel centre")


@pytest.mark.parametrize("bad, words", [("corrupt", "cannot read"), ("zero_spacing", "spacing")])
def test_infer_rejects_bad_lr(files, tmp_path, capsys, bad, words):
    out = tmp_path / "sr.nii.gz"
    _check(
        capsys, ["infer", str(BUNDLE), str(files[bad]), "-o", str(out)], [files[bad]], [out], words
    )


def test_infer_rejects_a_folder_that_is_no_bundle(files, tmp_path, capsys):
    out = tmp_path / "sr.nii.gz"
    _check(
        capsys,
        ["infer", str(files["folder"]), str(files["good"]), "-o", str(out)],
        [files["good"]],
        [out],
        "missing bundle config",
    )


@pytest.mark.parametrize(
    "case, words",
    [("folder", "not a bone3d bundle"), ("no_weights", "no trained weights"),
     ("variant", "no such variant"), ("not_zip", "is a .zip")],
)  # fmt: skip
def test_export_rejects(files, tmp_path, capsys, case, words):
    out = tmp_path / ("out.tar" if case == "not_zip" else "out.zip")
    bundle = files["folder"] if case == "folder" else BUNDLE
    argv = ["export", str(bundle), "-o", str(out)]
    if case == "no_weights":
        argv += ["--checkpoint", str(tmp_path / "missing.pt")]
    if case == "variant":
        argv += ["--variant", "4d"]
    _check(capsys, argv, [], [out], words)


def test_prepare_rejects_mismatched_lr_hr_fields(files, tmp_path, capsys):
    hr = write_volume(
        make_image(np.zeros((40, 40, 40), np.float32) + np.arange(40), spacing=(0.05,) * 3),
        tmp_path / "hr.nii.gz",
    )
    affine = np.diag([0.1, 0.1, 0.1, 1.0])
    affine[:3, 3] = [5.0, 0.0, 0.0]  # 5 mm away from the HR field
    lr = write_volume(
        make_image(np.ones((20, 20, 20), np.float32) * np.arange(20), affine=affine),
        tmp_path / "lr.nii.gz",
    )
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        f"specimen,lr,hr\ns1,{lr.name},{hr.name}\ns2,{lr.name},{hr.name}\ns3,{lr.name},{hr.name}\n"
    )
    out = tmp_path / "ds"
    _check(
        capsys,
        ["prepare", "-o", str(out), "--pairs", str(csv)],
        [hr, lr, csv],
        [out / "datalist.json"],
        "does not match",
    )


def test_phantom_rejects_impossible_parameters(tmp_path, capsys):
    out = tmp_path / "p.nii.gz"
    _check(capsys, ["phantom", "-o", str(out), "--bv-tv", "0.9"], [], [out], "bv_tv")
