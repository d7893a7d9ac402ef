"""benchmarks/fidelity.py scoring: every method on one region fixed by the data, so a method's
row does not depend on which other methods are in the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bone3d.data.phantom import make_phantom


def _fidelity():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baseline_rows_do_not_change_with_the_other_methods():
    fid = _fidelity()
    hr = make_phantom(shape=(50, 50, 50), spacing_mm=0.05, bv_tv=0.2, seed=4).image
    hr = hr.data[0].numpy().astype(np.float32)
    rng = np.random.default_rng(0)
    lr = hr + rng.normal(0, 150, hr.shape).astype(np.float32)
    short = lr[:49, :49, :49]  # a post-upsampling output a voxel short of the HR grid
    assert fid.scored_shape(hr.shape) == (48, 48, 48)
    alone = fid.score_volume({"LR": lr}, hr)
    beside = fid.score_volume({"LR": lr, "SR": short}, hr)
    assert [r for r in beside if r["method"] in ("LR", "HR")] == alone
    # the short output is scored on the same region: identical data, identical row
    sr = {r["voi"]: r for r in beside if r["method"] == "SR"}
    for r in (r for r in alone if r["method"] == "LR"):
        assert {k: v for k, v in sr[r["voi"]].items() if k != "method"} == {
            k: v for k, v in r.items() if k != "method"
        }
    with pytest.raises(ValueError, match="does not cover the scored region"):
        fid.score_volume({"LR": lr, "tiny": lr[:40, :40, :40]}, hr)


def test_purify_protocol_removes_a_marrow_speck_from_every_parameter():
    """A bright speck in the marrow (an SR artefact) adds a particle: Conn.D drops and Tb.Sp
    shrinks when scored raw; the purified protocol (BoneJ Purify per sub-VOI) drops it."""
    from scipy import ndimage as ndi

    fid = _fidelity()
    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.15, seed=5).image
    hr = hr.data[0].numpy().astype(np.float32)
    bone = hr > 0.5 * (hr.min() + hr.max())
    far = ndi.distance_transform_edt(~bone)
    far[:2], far[-2:], far[:, :2], far[:, -2:], far[:, :, :2], far[:, :, -2:] = (0,) * 6
    i, j, k = np.unravel_index(np.argmax(far[:24, :24, :24]), (24, 24, 24))
    assert far[i, j, k] > 4  # a marrow space wide enough to hold the speck apart from bone
    sr = hr.copy()
    sr[i - 1 : i + 1, j - 1 : j + 1, k - 1 : k + 1] = hr.max()
    vox = "block_000"

    def rows(purify):
        r = {x["method"]: x for x in fid.score_volume({"SR": sr}, hr, purify=purify)
             if x["voi"] == vox}  # fmt: skip
        return r["SR"], r["HR"]

    raw_sr, raw_hr = rows(False)
    assert raw_sr["conn_d_per_mm3"] < raw_hr["conn_d_per_mm3"]  # one more particle
    assert raw_sr["tb_sp_mm"] < raw_hr["tb_sp_mm"]
    pur_sr, pur_hr = rows(True)
    for p in ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3", "da"):
        assert abs(pur_sr[p] - pur_hr[p]) <= abs(raw_sr[p] - raw_hr[p])
    assert pur_sr["conn_d_per_mm3"] == pytest.approx(pur_hr["conn_d_per_mm3"])
