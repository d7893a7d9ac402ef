"""bone3d.data.phantom: deterministic, controllable trabecular phantoms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bone3d.data.phantom import PhantomSpec, make_phantom
from bone3d.errors import InputError

SMALL = dict(shape=(48, 48, 48), spacing_mm=0.05)


def test_same_seed_gives_identical_bytes():
    a = make_phantom(**SMALL, seed=7)
    b = make_phantom(**SMALL, seed=7)
    assert a.image.data.numpy().tobytes() == b.image.data.numpy().tobytes()
    assert a.truth.data.numpy().tobytes() == b.truth.data.numpy().tobytes()
    c = make_phantom(**SMALL, seed=8)
    assert a.truth.data.numpy().tobytes() != c.truth.data.numpy().tobytes()


@pytest.mark.parametrize("bv_tv", [0.05, 0.15, 0.35])
@pytest.mark.parametrize("rod_fraction", [0.0, 0.5, 1.0])
def test_bv_tv_hits_the_target(bv_tv, rod_fraction):
    ph = make_phantom(**SMALL, bv_tv=bv_tv, rod_fraction=rod_fraction, seed=1)
    truth = ph.truth.data[0].numpy()
    n = truth.size
    assert abs(truth.mean() - bv_tv) <= 2.0 / n + 1e-3  # quantile cut: exact up to ties


def test_thickness_and_spacing_look_like_vertebral_trabeculae():
    """Defaults: Tb.Th ~0.1-0.2 mm, Tb.Sp ~0.5-1.5 mm (human vertebra), measured by maximal
    inscribed spheres (porespy local thickness, radius per voxel in voxel units)."""
    import porespy as ps

    ph = make_phantom(shape=(96, 96, 96), seed=2)
    bone = ph.truth.data[0].numpy().astype(bool)
    th = 2 * ps.filters.local_thickness(bone)[bone].mean() * ph.spec.spacing_mm
    sp = 2 * ps.filters.local_thickness(~bone)[~bone].mean() * ph.spec.spacing_mm
    assert 0.10 <= th <= 0.22, th
    assert 0.5 <= sp <= 1.6, sp


def test_anisotropy_aligns_structure_with_z():
    """Mean run length of bone along z exceeds that along x when anisotropy > 1."""

    def mean_run(b, axis):
        b = np.moveaxis(b, axis, -1).reshape(-1, b.shape[axis]).astype(np.int8)
        d = np.diff(np.pad(b, ((0, 0), (1, 1))), axis=1)
        starts, ends = np.nonzero(d == 1), np.nonzero(d == -1)
        return (ends[1] - starts[1]).mean()

    iso = make_phantom(**SMALL, anisotropy=1.0, seed=3).truth.data[0].numpy()
    ani = make_phantom(**SMALL, anisotropy=2.0, seed=3).truth.data[0].numpy()
    assert mean_run(ani, 2) / mean_run(ani, 0) > 1.3 * mean_run(iso, 2) / mean_run(iso, 0)


def test_cortex_has_the_requested_closed_pores():
    ph = make_phantom(
        shape=(64, 64, 32),
        spacing_mm=0.05,
        cortex=True,
        ct_th_mm=0.4,
        n_pores=5,
        pore_radius_mm=0.08,
        seed=4,
    )
    bone = ph.truth.data[0].numpy().astype(bool)
    cortex = ph.cortex.data[0].numpy().astype(bool)
    assert ph.pores == 5
    # closed pores: non-bone components inside the cortical shell that touch no other space
    holes, n = ndi.label(cortex & ~bone)
    background, _ = ndi.label(~bone)
    enclosed = [
        i
        for i in range(1, n + 1)
        if np.all(background[holes == i] == background[holes == i][0])
        and (background == background[holes == i][0]).sum() == (holes == i).sum()
    ]
    assert len(enclosed) == 5


def test_perforation_removes_that_fraction_cuts_connections_and_keeps_thickness():
    """Bone loss by perforation: the same network (same seed) minus the stated fraction of its
    bone, no voxel added; what is left has about the same Tb.Th, wider Tb.Sp and under half the
    Conn.D (plates and rods cut through, as in osteoporotic bone)."""
    from bone3d.morphometry import morphometry

    whole = make_phantom(**SMALL, bv_tv=0.15, seed=3).truth.data[0].numpy().astype(bool)
    lost = make_phantom(**SMALL, bv_tv=0.15, seed=3, perforation=0.6)
    bone = lost.truth.data[0].numpy().astype(bool)
    assert not (bone & ~whole).any()
    assert bone.sum() / whole.sum() == pytest.approx(0.4, abs=0.01)
    assert lost.info["bv_tv_trabecular"] == pytest.approx(0.06, abs=0.002)
    metrics = ["bv_tv", "tb_th", "tb_sp", "connectivity"]
    before, after = (morphometry(b, (0.05,) * 3, metrics=metrics) for b in (whole, bone))
    assert after["tb_th_mm"] == pytest.approx(before["tb_th_mm"], rel=0.1)
    assert after["tb_sp_mm"] > 1.3 * before["tb_sp_mm"]
    assert after["conn_d_per_mm3"] < 0.5 * before["conn_d_per_mm3"]


def test_bad_spec_is_refused():
    with pytest.raises(InputError, match="perforation"):
        make_phantom(**SMALL, perforation=1.0)
    with pytest.raises(InputError, match="perforation_mm"):
        make_phantom(**SMALL, perforation=0.5, perforation_mm=0.0)
    with pytest.raises(InputError, match="bv_tv"):
        make_phantom(**SMALL, bv_tv=0.9)
    with pytest.raises(InputError, match="tb_th_mm"):
        make_phantom(**SMALL, tb_th_mm=0.05)
    with pytest.raises(InputError):
        make_phantom(PhantomSpec(shape=(4, 4, 4)))
