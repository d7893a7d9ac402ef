"""Datalists: split by specimen, written by `bone3d prepare`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bone3d.data.datalist import read_datalist, split_by_specimen, split_hash
from bone3d.data.prepare import prepare
from bone3d.errors import InputError
from bone3d.io import read_volume


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
