"""Datalists: split by specimen, written by `bone3d prepare`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bone3d.data.datalist import hr_bone_level, read_datalist, split_by_specimen, split_hash
from bone3d.data.prepare import prepare
from bone3d.errors import InputError
from bone3d.io import read_volume
from bone3d.morphometry.thresholds import threshold_value


def test_split_is_by_specimen_and_deterministic():
    ids = [f"s{i}" for i in range(10)] * 3  # several volumes per specimen
    a = split_by_specimen(ids, 2, 2, seed=1)
    b = split_by_specimen(ids, 2, 2, seed=1)
    assert a == b
    sets = [set(a[k]) for k in ("training", "validation", "test")]
    assert (
        sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    )
    assert set().union(*sets) == set(ids)
    assert (len(sets[1]), len(sets[2])) == (2, 2)
    assert split_hash(a) != split_hash(split_by_specimen(ids, 2, 2, seed=2))
    with pytest.raises(InputError):
        split_by_specimen(["a", "b"], 1, 1)


def test_prepare_phantoms_writes_pairs_on_one_field(tmp_path):
    path = prepare(
        tmp_path / "ds",
        phantoms=3,
        preset="mdct",
        n_val=1,
        n_test=1,
        phantom_shape=(48, 48, 48),
        progress=False,
    )
    data = read_datalist(path)
    specimens = [e["specimen"] for k in ("training", "validation", "test") for e in data[k]]
    assert sorted(specimens) == ["phantom000", "phantom001", "phantom002"]
    entry = data["training"][0]
    lr, hr = read_volume(entry["image"]), read_volume(entry["target"])
    np.testing.assert_allclose(lr.spacing, (100 / 512, 100 / 512, 0.1), rtol=1e-6)
    # the HR crop covers the LR field: same starting corner, whole HR voxels inside
    lr_corner = lr.affine[:3, 3] - np.asarray(lr.spacing) / 2
    hr_corner = hr.affine[:3, 3] - np.asarray(hr.spacing) / 2
    np.testing.assert_allclose(lr_corner, hr_corner, atol=1e-5)
    assert all(
        h * hs <= n * ls + 1e-6
        for h, hs, n, ls in zip(
            hr.spatial_shape, hr.spacing, lr.spatial_shape, lr.spacing, strict=True
        )
    )
    raw = json.loads(path.read_text())
    assert not raw["training"][0]["image"].startswith("/")  # portable relative paths
    assert raw["lr_range"] == [1.4 * v for v in raw["hr_range"]]


def test_prepare_cli_and_bad_source(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "prepare", "-o", str(tmp_path / "d"), "--phantoms", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "specimen" in res.stderr.strip().splitlines()[-1]
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "prepare", "-o", str(tmp_path / "d"), "--hr-dir", str(tmp_path / "none")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2


def test_prepare_cortical_phantoms_add_bone_free_space(tmp_path):
    kw = {"phantoms": 3, "preset": "hrpqct", "phantom_shape": (40, 40, 24), "progress": False}
    plain = read_datalist(prepare(tmp_path / "a", **kw))
    cort = read_datalist(prepare(tmp_path / "b", cortical=1, **kw))
    assert cort["cortical_phantoms"] == 1 and "cortical_phantoms" not in plain

    def entries(d):
        return {e["specimen"]: e for k in ("training", "validation", "test") for e in d[k]}

    a, b = entries(plain), entries(cort)
    for sid in ("phantom000", "phantom001"):  # the others are drawn as without a cortex
        np.testing.assert_array_equal(
            read_volume(a[sid]["target"]).data, read_volume(b[sid]["target"]).data
        )
        np.testing.assert_array_equal(
            read_volume(a[sid]["image"]).data, read_volume(b[sid]["image"]).data
        )

    # the shell's outside: beyond the ellipse with semi-axes 0.45 and 0.40 of the 40^2 box
    c = (np.arange(40) - 19.5) / 40
    outside = (c[:, None] / 0.45) ** 2 + (c[None, :] / 0.40) ** 2 > 1

    def bone_outside(entry):  # bone fraction there (the HR crop may lose the last voxels)
        bone = read_volume(entry["truth"]).data[0].numpy() > 0
        out = outside[: bone.shape[0], : bone.shape[1]]
        assert out.mean() > 0.4  # the share of the box with no bone in a cortical phantom
        return float(bone[out].mean())

    assert bone_outside(a["phantom002"]) > 0.05  # trabeculae fill a plain phantom's box
    assert bone_outside(b["phantom002"]) == 0.0
    rec = json.loads((tmp_path / "b" / "phantom002" / "degradation.json").read_text())["phantom"]
    assert rec["cortex"] and 5 <= rec["n_pores"] < 30
    # capped at a third of the shorter semi-axis (0.40 x 40 voxels x 0.05 mm / 3)
    assert 0.1 < rec["ct_th_mm"] <= 0.8 / 3 + 1e-9
    with pytest.raises(InputError, match="cortical"):
        prepare(tmp_path / "c", cortical=4, **kw)
    with pytest.raises(InputError, match="phantoms only"):
        prepare(tmp_path / "d", hr_dir=tmp_path / "a", cortical=1, progress=False)
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "prepare", "-o", str(tmp_path / "e"), "--phantoms", "3",
         "--cortical", "-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "non-negative" in res.stderr


def test_hr_bone_level_is_one_isodata_level_over_the_training_targets(tmp_path):
    """The morphometry loss's level: ImageJ IsoData on the training HR voxels pooled, in the
    network's 0..1 units over ``hr_range``; not a level per volume, nor one from test data."""
    path = prepare(
        tmp_path / "ds", phantoms=3, preset="hrpqct", n_val=1, n_test=1,
        phantom_shape=(40, 40, 40), progress=False,
    )  # fmt: skip
    data = read_datalist(path)
    lo, hi = data["hr_range"]
    pooled = np.concatenate(
        [np.clip(read_volume(e["target"]).data.numpy().ravel(), lo, hi) for e in data["training"]]
    )
    level = hr_bone_level(path)
    expected = (threshold_value(pooled, "isodata") - lo) / (hi - lo)
    assert 0 < level < 1
    assert level == pytest.approx(expected, abs=2 / 256)  # histogram bins: window vs min..max
    marrow, bone = np.percentile((pooled - lo) / (hi - lo), [5, 95])
    assert marrow < level < bone
    raw = json.loads(path.read_text())
    for e in raw["training"]:
        e.pop("target")
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="no HR target"):
        hr_bone_level(path)
