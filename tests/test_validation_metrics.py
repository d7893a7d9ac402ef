"""Validation metrics of the bundles: morphometric errors of a prediction against HR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bone3d.data.phantom import make_phantom
from bone3d.evaluation.metrics import BVTVAbsError, MorphometryPanel
from bone3d.morphometry.metrics import morphometry
from bone3d.morphometry.thresholds import segment


@pytest.fixture(scope="module")
def pair():
    ph = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.2, seed=4)
    hr = ph.image.data[0].numpy().astype(np.float32)
    # a 'prediction' whose trabeculae are one voxel thinner: grey-level erosion
    pred = ndimage.grey_erosion(hr, size=(2, 2, 2)).astype(np.float32)
    return torch.from_numpy(pred)[None, None], torch.from_numpy(hr)[None, None]


def test_relative_errors_equal_the_morphometry_of_each_volume(pair):
    pred, hr = pair
    panel = MorphometryPanel("isodata", spacing=(0.05, 0.05, 0.05))
    got = {}
    for param in MorphometryPanel.PARAMETERS:
        metric = panel.error(param)
        metric(pred, hr)
        got[param] = float(metric.aggregate())
    ref = []
    for vol in (pred, hr):
        bone, _ = segment(vol[0, 0].numpy(), "isodata")
        ref.append(
            morphometry(bone, (0.05,) * 3, metrics=("bv_tv", "tb_th", "tb_sp", "connectivity"))
        )
    for param, value in got.items():
        expected = abs(ref[0][param] - ref[1][param]) / abs(ref[1][param])
        assert value == pytest.approx(expected, rel=1e-6), param
    assert got["tb_th_mm"] > 0.05  # eroded trabeculae are measurably thinner
    assert ref[0]["tb_th_mm"] < ref[1]["tb_th_mm"] and ref[0]["tb_sp_mm"] > ref[1]["tb_sp_mm"]
    # BV/TV relative error is the absolute error over the target's BV/TV
    absolute = BVTVAbsError("isodata")
    absolute(pred, hr)
    assert got["bv_tv"] == pytest.approx(float(absolute.aggregate()) / ref[1]["bv_tv"], rel=1e-6)


def test_identical_volumes_have_zero_error_and_one_measurement(pair, monkeypatch):
    _, hr = pair
    import bone3d.morphometry.metrics as mm

    calls = []
    real = mm.morphometry
    monkeypatch.setattr(mm, "morphometry", lambda *a, **k: calls.append(1) or real(*a, **k))
    panel = MorphometryPanel(spacing=(0.05,) * 3)
    target = hr.clone()  # as in validation: every metric handler gets the same two tensors
    for param in MorphometryPanel.PARAMETERS:
        m = panel.error(param)
        m(hr, target)
        assert float(m.aggregate()) == 0.0
    assert len(calls) == 2  # one pair measured once, shared by the four metrics


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="parameter must be one of"):
        MorphometryPanel().error("da")
