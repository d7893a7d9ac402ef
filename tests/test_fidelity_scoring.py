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
