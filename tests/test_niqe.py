"""niqe_uct: distribution fits with known shapes, and score ordering on degraded micro-CT-like volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bone3d.data.phantom import make_phantom
from bone3d.errors import InputError
from bone3d.evaluation.niqe import fit_aggd, fit_ggd, fit_niqe, mscn, niqe_uct


def test_ggd_and_aggd_fits_recover_known_shapes():
    rng = np.random.default_rng(0)
    a, var = fit_ggd(rng.normal(0, 2, 200_000))  # Gaussian: shape 2, variance 4
    assert a == pytest.approx(2.0, abs=0.03) and var == pytest.approx(4.0, rel=0.02)
    a, _ = fit_ggd(rng.laplace(0, 1, 200_000))  # Laplacian: shape 1
    assert a == pytest.approx(1.0, abs=0.03)
    # asymmetric Gaussian (AGGD with shape 2): continuous density at 0, so the left half has
    # probability sl / (sl + sr); left SD 0.5, right SD 2
    n = 400_000
    left = rng.random(n) < 0.5 / 2.5
    x = np.where(left, -np.abs(rng.normal(0, 0.5, n)), np.abs(rng.normal(0, 2.0, n)))
    a, eta, lvar, rvar = fit_aggd(x)
    assert a == pytest.approx(2.0, abs=0.05)
    assert lvar == pytest.approx(0.25, rel=0.03) and rvar == pytest.approx(4.0, rel=0.03)
    assert eta > 0  # the heavier right side moves the mean right


def test_mscn_is_normalised():
    rng = np.random.default_rng(1)
    img = ndi.gaussian_filter(rng.random((128, 128)) * 255, 2)
    m = mscn(img)
    assert abs(m.mean()) < 0.05 and 0.2 < m.std() < 1.5


@pytest.fixture(scope="module")
def model_and_test():
    vols = [
        make_phantom(shape=(64, 64, 64), spacing_mm=0.04, tb_th_mm=0.12, seed=s)
        .image.data[0]
        .numpy()
        for s in range(4)
    ]
    return fit_niqe(vols[:3], (-200, 1200)), vols[3]


def test_niqe_uct_orders_degradations(model_and_test):
    model, hr = model_and_test
    assert model["name"] == "niqe_uct" and len(model["mu"]) == 36
    rng = np.random.default_rng(2)
    clean = niqe_uct(hr, model)
    mild = niqe_uct(ndi.gaussian_filter(hr, 0.7), model)
    strong = niqe_uct(ndi.gaussian_filter(hr, 1.5), model)
    noisy = niqe_uct(hr + rng.normal(0, 150, hr.shape), model)
    assert clean < mild < strong  # blur moves away from the HR domain, monotonically
    assert clean < noisy


def test_niqe_refuses_tiny_or_flat_input(model_and_test):
    model, _ = model_and_test
    with pytest.raises(InputError, match="patch"):
        niqe_uct(np.zeros((8, 8, 8)), model)
    with pytest.raises(InputError, match="window"):
        fit_niqe([np.zeros((40, 40, 40))], (5, 5))
