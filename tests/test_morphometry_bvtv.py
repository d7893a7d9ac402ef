"""BV/TV with global thresholds (the full morphometry panel has its own tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from skimage import filters

from bone3d.errors import InputError
from bone3d.io import make_image, write_volume
from bone3d.morphometry import bone_volume_fraction, segment, threshold_value


def test_bv_tv_of_a_known_slab_with_and_without_voi():
    bone = np.zeros((10, 10, 10), bool)
    bone[2:6] = True  # 4 of 10 planes
    assert bone_volume_fraction(bone)["bv_tv"] == pytest.approx(0.4)
    voi = np.zeros_like(bone)
    voi[:5] = True  # 3 of 5 planes are bone
    res = bone_volume_fraction(bone, voi=voi, spacing=(0.1, 0.2, 0.5))
    assert res["bv_tv"] == pytest.approx(0.6)
    assert res["bv_mm3"] == pytest.approx(300 * 0.01)
    assert res["tv_mm3"] == pytest.approx(500 * 0.01)
    with pytest.raises(InputError, match="empty"):
        bone_volume_fraction(bone, voi=np.zeros_like(bone))


@pytest.mark.parametrize("method", ["isodata", "otsu"])
def test_global_thresholds_separate_two_noisy_phases(rng, method):
    truth = rng.random((30, 30, 30)) < 0.2
    grey = np.where(truth, 1000.0, 0.0) + rng.normal(0, 80, truth.shape)
    bone, t = segment(grey, method)
    assert 300 < t < 700
    assert abs(bone.mean() - truth.mean()) < 0.005
    if method == "otsu":
        assert t == pytest.approx(filters.threshold_otsu(grey))
    else:  # ImageJ's IsoData on a 256-bin histogram: within one bin of the continuous level
        assert abs(t - filters.threshold_isodata(grey)) <= np.ptp(grey) / 256 * 1.5


def test_threshold_refuses_constant_images_and_empty_masks():
    with pytest.raises(InputError, match="constant"):
        threshold_value(np.ones((4, 4, 4)))
    with pytest.raises(InputError, match="empty mask"):
        threshold_value(np.arange(64.0).reshape(4, 4, 4), mask=np.zeros((4, 4, 4), bool))


def test_morpho_cli_json(tmp_path, rng):
    grey = np.zeros((20, 20, 20), np.float32)
    grey[:, :, :5] = 1000
    path = write_volume(
        make_image(grey + rng.normal(0, 10, grey.shape).astype(np.float32), spacing=(0.05,) * 3),
        tmp_path / "g.nii.gz",
    )
    out = tmp_path / "m.json"
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "morpho", str(path), "--json", str(out)],
        capture_output=True,
        text=True,
        encoding="utf-8",  # the table is drawn with Unicode box characters
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["bv_tv"] == pytest.approx(0.25)
    assert data["tv_mm3"] == pytest.approx(8000 * 0.05**3)
    assert data["spacing_mm"] == pytest.approx([0.05] * 3)
    assert data["threshold"]["method"] == "isodata"
