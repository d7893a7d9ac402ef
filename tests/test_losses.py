"""Morphometry-aware losses: exact at the binary limit, correct gradients, and they move a
prediction's hard morphometry towards the target's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import SoftclDiceLoss
from scipy import ndimage as ndi
from skimage.measure import euler_number

from bone3d.data.phantom import make_phantom
from bone3d.losses import (
    MorphometryLoss,
    class_means,
    fabric_profile,
    granulometry,
    intercept_density,
    lattice_directions,
    otsu_threshold,
    soft_euler,
    soft_thickness,
)
from bone3d.morphometry.anisotropy import fabric_tensor
from bone3d.morphometry.connectivity import euler_characteristic
from bone3d.morphometry.thickness import local_thickness_map


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))[None, None]


def _torus(shape=(40, 40, 20), big=12.0, small=4.0) -> np.ndarray:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    c = [(s - 1) / 2 for s in shape]
    rho = np.hypot(z - c[0], y - c[1])
    return (rho - big) ** 2 + (x - c[2]) ** 2 <= small**2


def _shell(n=30, r_out=12.0, r_in=8.0) -> np.ndarray:
    g = np.mgrid[:n, :n, :n].astype(float) - (n - 1) / 2
    r = np.sqrt((g**2).sum(0))
    return (r <= r_out) & (r >= r_in)


@pytest.mark.parametrize("seed", [1, 2])
def test_soft_euler_is_exact_on_binary_volumes(seed):
    b = make_phantom(shape=(40, 40, 40), seed=seed).truth.data[0].numpy().astype(bool)
    cases = {"phantom": b, "torus": _torus(), "shell": _shell()}
    got = {k: float(soft_euler(_t(v))) for k, v in cases.items()}
    assert got["torus"] == 0.0 and got["shell"] == 2.0  # one handle; one cavity
    assert got["phantom"] == euler_characteristic(b)
    assert got["phantom"] != 0  # a trabecular network has many handles


def test_soft_euler_2d_matches_skimage():
    b = make_phantom(shape=(40, 40, 40), seed=4).truth.data[0].numpy().astype(bool)
    for sl in (b[:, :, 5], b[12], b[:, 30]):
        # 8-connected foreground, 4-connected background: scikit-image's connectivity=2
        assert float(soft_euler(_t(sl))) == euler_number(sl, connectivity=2)


def test_soft_euler_counts_faint_specks_fractionally():
    v = torch.zeros(1, 1, 9, 9, 9, dtype=torch.float64)
    v[0, 0, 2, 2, 2] = 0.25
    v[0, 0, 6, 6, 6] = 0.5
    assert float(soft_euler(v)) == pytest.approx(0.75)  # isolated voxels: 8 - 12 + 6 - 1 = 1 each


@pytest.mark.parametrize("thick", [1, 2, 3, 4, 5, 7])
def test_soft_thickness_of_plates(thick):
    # plates cut by the border: the border is not a boundary, only their faces are
    v = np.zeros((16, 16, 30))
    v[:, :, 8 : 8 + thick] = 1
    want = thick if thick % 2 else thick - 1  # only odd diameters are probed
    assert float(soft_thickness(_t(v), 5)) == pytest.approx(want, abs=1e-9)
    bar = v[:, 0, :]  # the same section in 2D
    assert float(soft_thickness(_t(bar), 5)) == pytest.approx(want, abs=1e-9)


def test_granulometry_is_the_thickness_distribution_of_a_plate_stack():
    v = np.zeros((12, 12, 40))
    v[:, :, 2:5] = 1  # 3 thick
    v[:, :, 10:17] = 1  # 7 thick
    g = granulometry(_t(v), 4)[0, 0].numpy() / v.mean()
    # fraction of bone at least 3, 5, 7, 9 voxels thick
    np.testing.assert_allclose(g, [1.0, 0.7, 0.7, 0.0], atol=1e-12)


def test_soft_thickness_orders_phantoms_like_local_thickness():
    lt, soft = [], []
    for tb_th in (0.10, 0.15, 0.22):
        b = make_phantom(shape=(48, 48, 48), tb_th_mm=tb_th, seed=7).truth.data[0].numpy() > 0
        lt.append(local_thickness_map(b)[b].mean())
        soft.append(float(soft_thickness(_t(b), 6)))
    assert np.all(np.diff(lt) > 0)
    assert np.all(np.diff(soft) > 0)


def _random_soft(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def test_gradients_are_correct():
    x = _random_soft((1, 1, 5, 6, 5), 0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: soft_euler(a).sum(), (x,))
    assert torch.autograd.gradcheck(lambda a: granulometry(a, 2).sum(), (x,))
    assert torch.autograd.gradcheck(lambda a: (fabric_profile(a) * torch.arange(13.0)).sum(), (x,))
    x2 = _random_soft((2, 1, 7, 6), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: soft_euler(a).sum(), (x2,))
    assert torch.autograd.gradcheck(lambda a: granulometry(a, 2).sum(), (x2,))
    assert torch.autograd.gradcheck(lambda a: (intercept_density(a) ** 2).sum(), (x2,))
    # the soft clDice whose gradient the straight-through skeleton term takes (MONAI's)
    cl = SoftclDiceLoss(iter_=2)
    assert torch.autograd.gradcheck(lambda a: cl(a, _random_soft((1, 1, 5, 6, 5), 7)), (x,))
    assert torch.autograd.gradcheck(lambda a: cl(a, _random_soft((2, 1, 7, 6), 8)), (x2,))
    y = _random_soft((1, 1, 6, 6, 6), 2)
    x3 = _random_soft((1, 1, 6, 6, 6), 5).requires_grad_()
    loss = MorphometryLoss(
        weights={"euler": 0.0, "density": 0.1},  # euler is straight-through: see below
        threshold=0.5, temperature=0.2, thickness_radius=1, spacing_radius=2,
    )  # fmt: skip
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x3,))


def test_euler_gradient_at_a_binary_mask_is_the_discrete_flip_change():
    """soft_euler is multilinear, so at a binary mask d chi / d p_j = chi(j bone) - chi(j marrow):
    what the straight-through Euler term of MorphometryLoss descends on."""
    b = make_phantom(shape=(16, 16, 16), seed=8).truth.data[0].numpy().astype(bool)
    p = _t(b).requires_grad_()
    soft_euler(p).sum().backward()
    rng = np.random.default_rng(0)
    for idx in map(tuple, rng.integers(0, 16, size=(25, 3))):
        on, off = b.copy(), b.copy()
        on[idx], off[idx] = True, False
        change = euler_characteristic(on) - euler_characteristic(off)
        assert float(p.grad[(0, 0, *idx)]) == pytest.approx(change)


def test_loss_is_zero_on_the_target_and_positive_elsewhere():
    y = _random_soft((2, 1, 12, 12, 12), 3).float()
    loss = MorphometryLoss()
    assert float(loss(y, y)) == 0.0
    assert set(loss.terms) == {"pixel", "bvtv", "thickness", "spacing", "euler", "fabric"}
    assert float(loss(y * 0.9, y)) > 0
    with pytest.raises(ValueError, match="unknown loss weights"):
        MorphometryLoss(weights={"bvtw": 1.0})
    with pytest.raises(ValueError, match="differ"):
        loss(y, y[:, :, :-1])


def test_channels_are_separate_images():
    y = _random_soft((1, 2, 10, 10), 4)
    both = MorphometryLoss(weights={"pixel": 0.0}, threshold=0.5)
    one = MorphometryLoss(weights={"pixel": 0.0}, threshold=0.5)
    pred = y.flip(-1)
    total = float(both(pred, y))
    parts = [float(one(pred[:, i : i + 1], y[:, i : i + 1])) for i in range(2)]
    assert total == pytest.approx(np.mean(parts))


@pytest.mark.parametrize("dims", [2, 3])
def test_intercept_density_of_a_plate_stack_is_its_crossing_count(dims):
    """Plates normal to axis 0: a lattice line along v crosses a boundary between two voxels
    exactly where axis 0 changes phase, so P_L(v) = (boundaries between consecutive planes) /
    (n - 1) / |v| when v has an axis-0 step, and 0 for directions inside the plates."""
    n = 23
    planes = np.zeros(n, bool)
    for start, width in [(0, 2), (5, 3), (11, 4), (19, 1)]:
        planes[start : start + width] = True
    b = np.broadcast_to(planes.reshape((n,) + (1,) * (dims - 1)), (n,) + (9,) * (dims - 1))
    crossings = np.count_nonzero(planes[1:] != planes[:-1])
    got = intercept_density(_t(b))[0, 0].numpy()
    for v, value in zip(lattice_directions(dims), got, strict=True):
        want = crossings / (n - 1) / np.linalg.norm(v) if v[0] else 0.0
        assert value == pytest.approx(want, abs=1e-12), v


def _lattice_da(b: np.ndarray) -> float:
    """DA of the MIL ellipsoid fitted (as `fabric_tensor` does) to MIL(v) = 1 / P_L(v) along
    the 13 lattice directions."""
    pl = intercept_density(_t(b))[0, 0].numpy()
    v = np.array(lattice_directions(3), float)
    x, y, z = (v / np.linalg.norm(v, axis=1, keepdims=True) * (1 / pl)[:, None]).T
    design = np.stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z], axis=1)
    c, *_ = np.linalg.lstsq(design, np.ones(len(x)), rcond=None)
    m = np.array([[c[0], c[3], c[4]], [c[3], c[1], c[5]], [c[4], c[5], c[2]]])
    e = np.linalg.eigvalsh(m)
    return 1.0 - e.min() / e.max()


def test_lattice_intercept_densities_carry_the_mil_anisotropy():
    """The 13 lattice P_L values that the fabric term compares give, through the same ellipsoid
    fit, nearly the DA of the 256-direction MIL of `fabric_tensor` and the same ordering of
    phantoms stretched by 1, 1.5 and 2.5 (observed: lattice 0.29, 0.81, 1.00; MIL 0.25, 0.71,
    0.95; the lattice lines step one voxel, the MIL lines 1.73, and DA falls with the step)."""
    lattice, mil = [], []
    for stretch in (1.0, 1.5, 2.5):
        b = make_phantom(shape=(48, 48, 48), anisotropy=stretch, seed=1).truth.data[0].numpy()
        lattice.append(_lattice_da(b > 0))
        mil.append(fabric_tensor(b > 0)["da"])
    assert np.allclose(lattice, mil, atol=0.12), (lattice, mil)
    assert lattice == sorted(lattice) and mil == sorted(mil)


def test_otsu_each_segments_every_image_at_its_own_level():
    """A prediction that is the target plus a grey-level offset has the same structure:
    segmented each at its own Otsu level (``otsu_each``) every morphometric term is zero; at the
    target's level (``otsu``) its BV/TV is off."""
    y = torch.from_numpy(make_phantom(shape=(24, 24, 24), seed=3).image.data[0].numpy())
    y = ((y - y.min()) / (y.max() - y.min()))[None, None]
    pred = y + 0.2
    each = MorphometryLoss(threshold="otsu_each")
    each(pred, y)
    assert each.terms["pixel"] == pytest.approx(0.2, rel=1e-4)
    for k in ("bvtv", "thickness", "spacing", "euler", "fabric"):
        assert each.terms[k] == pytest.approx(0.0, abs=1e-4), k
    target = MorphometryLoss(threshold="otsu")
    target(pred, y)
    assert target.terms["bvtv"] > 0.1
    with pytest.raises(ValueError, match="otsu_each"):
        MorphometryLoss(threshold="isodata")


def test_a_marrow_patch_holds_no_bone_at_a_fixed_level_but_noise_bone_at_its_own_otsu():
    """A 32^3 training patch of marrow alone (HR noise, no bone): its own Otsu level cuts the
    noise in two, so the target's mask calls half the patch bone and the terms push a clean
    prediction towards noise specks; at one level for all patches (the bundles pass the training
    HR's IsoData level, `bone3d.data.datalist.hr_bone_level`) the patch has no bone and a clean
    marrow prediction costs only its pixel error."""
    g = torch.Generator().manual_seed(0)
    marrow = 0.143  # 0 mg HA/cm^3 in the -200..1200 window
    y = marrow + 0.02 * torch.randn((1, 1, 32, 32, 32), generator=g)
    pred = torch.full_like(y, marrow)
    own = MorphometryLoss(threshold="otsu")
    own(pred, y)
    # weighted (0.01, 0.1, 0.1) each outweighs the pixel error (0.016) many times
    assert own.terms["euler"] > 10 and own.terms["fabric"] > 0.5 and own.terms["thickness"] > 0.1
    fixed = MorphometryLoss(threshold=0.46875)
    fixed(pred, y)
    assert fixed.terms["pixel"] == pytest.approx(own.terms["pixel"])
    for k in ("bvtv", "thickness", "spacing", "euler", "fabric"):
        assert fixed.terms[k] == pytest.approx(0.0, abs=5e-3), k


def test_otsu_threshold_splits_the_two_phases():
    b = make_phantom(shape=(32, 32, 32), seed=5)
    img = torch.from_numpy(b.image.data[0].numpy()[None, None])
    t = float(otsu_threshold(img))
    assert 0 < t < 1000  # between marrow (0) and tissue (1000 mg HA/cm^3)
    seg = img[0, 0].numpy() > t
    truth = b.truth.data[0].numpy() > 0
    assert (seg == truth).mean() > 0.95


def _descend(weights, steps=60, start_anisotropy=None, **options):
    """Optimise a blurred, low-contrast (LR-like) image of a phantom by the loss alone; return
    the hard morphometry (threshold 0.5) of the target, the start and the end. With
    ``start_anisotropy`` the target is stretched along z (1.8) and the start is a different
    structure of that anisotropy."""
    stretch = {} if start_anisotropy is None else {"anisotropy": 1.8}
    truth = make_phantom(shape=(32, 32, 32), bv_tv=0.2, seed=6, **stretch).truth.data[0].numpy()
    truth = truth > 0
    start = truth
    if start_anisotropy is not None:
        phantom = make_phantom(shape=(32, 32, 32), bv_tv=0.2, seed=6, anisotropy=start_anisotropy)
        start = phantom.truth.data[0].numpy() > 0
    blurred = ndi.gaussian_filter(
        start.astype(np.float32), 1.5 if start_anisotropy is None else 1.0
    )
    blurred = 0.3 + 0.5 * (blurred - blurred.min()) / np.ptp(blurred)
    y = torch.from_numpy(truth.astype(np.float32))[None, None]
    x = torch.from_numpy(blurred)[None, None].clone().requires_grad_()
    loss = MorphometryLoss(
        weights={"pixel": 0.0, **weights}, threshold=0.5, temperature=0.05, **options
    )
    opt = torch.optim.Adam([x], lr=0.02)

    def hard(seg):
        return {
            "bv_tv": seg.mean(),
            "chi": euler_characteristic(seg),
            "tb_th": local_thickness_map(seg)[seg].mean(),
            "tb_sp": local_thickness_map(~seg)[~seg].mean(),
            "da": fabric_tensor(seg)["da"],
        }

    start = hard(x.detach()[0, 0].numpy() > 0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss(x, y).backward()
        opt.step()
    return hard(truth), start, hard(x.detach()[0, 0].numpy() > 0.5)


def test_descending_the_loss_moves_hard_morphometry_to_the_target():
    """The blurred start has BV/TV 0.27 (target 0.20), Tb.Th 5.6 voxels (4.0), a far less
    negative chi (-4 vs -16); the full loss (default options) brings every hard parameter
    closer, BV/TV and Tb.Th by more than half."""
    want, start, end = _descend({})
    for k in ("bv_tv", "tb_th"):
        assert abs(end[k] - want[k]) < 0.5 * abs(start[k] - want[k]), k
    for k in ("tb_sp", "chi"):
        assert abs(end[k] - want[k]) < abs(start[k] - want[k]), k


@pytest.mark.parametrize(
    "term, parameter", [("bvtv", "bv_tv"), ("thickness", "tb_th"), ("spacing", "tb_sp")]
)
def test_each_term_moves_its_own_parameter(term, parameter):
    only = {k: 0.0 for k in ("bvtv", "thickness", "spacing", "euler", "fabric")}
    want, start, end = _descend({**only, term: 1.0}, spacing_pool=1)  # full resolution
    assert abs(end[parameter] - want[parameter]) < 0.5 * abs(start[parameter] - want[parameter])


def test_fabric_term_moves_da_towards_the_target():
    """From a blurred isotropic structure (DA 0.79 in this 32^3 patch) towards a stretched one
    (DA 0.94), the fabric term alone closes over a third of the DA gap (about 40 % in 60
    steps)."""
    only = {k: 0.0 for k in ("bvtv", "thickness", "spacing", "euler", "fabric")}
    want, start, end = _descend({**only, "fabric": 1.0}, start_anisotropy=1.0)
    assert abs(end["da"] - want["da"]) < (2 / 3) * abs(start["da"] - want["da"])
    assert end["da"] > start["da"]


def _rods(n=24, gap=False) -> np.ndarray:
    """Two 3-voxel plates joined by four 3 x 3 rods (chi -2); ``gap``: the first rod cut by a
    3-voxel gap (chi -1, one handle fewer)."""
    b = np.zeros((n, n, n), bool)
    b[2:5] = b[n - 5 : n - 2] = True
    for y, x in [(6, 6), (6, n - 7), (n - 7, 6), (n - 7, n - 7)]:
        b[2 : n - 2, y - 1 : y + 2, x - 1 : x + 2] = True
    if gap:
        b[11:14, 5:8, 5:8] = False
    return b


def test_cldice_pulls_a_broken_rod_together_where_the_euler_term_pushes_it_apart():
    """A rod cut by a gap longer than one voxel: setting any one gap voxel to bone adds a
    particle, so the Euler term's gradient (the discrete flip change) pushes the gap towards
    marrow as it does every marrow voxel, while the skeleton coverage pulls the gap's mid-line
    towards bone and leaves marrow away from the target's skeleton alone."""
    target, broken = _rods(), _rods(gap=True)
    assert euler_characteristic(target) == -2 and euler_characteristic(broken) == -1
    y, grads = _t(target), {}
    for term in ("cldice", "euler"):
        loss = MorphometryLoss(
            weights=dict.fromkeys(MorphometryLoss.DEFAULT_WEIGHTS, 0.0) | {term: 1.0},
            threshold=0.5, temperature=0.2,
        )  # fmt: skip
        assert float(loss(y, y)) < 1e-3  # the masks agree
        x = _t(broken).requires_grad_()
        value = loss(x, y)
        assert float(value.detach()) > 1e-3
        value.backward()
        grads[term] = x.grad[0, 0].numpy()
    centre, far = (12, 6, 6), (12, 12, 12)
    assert grads["cldice"][centre] < 0 and grads["cldice"][far] == 0.0
    assert grads["cldice"].min() == grads["cldice"][11:14, 6, 6].min()  # on the gap's mid-line
    assert grads["euler"][centre] > 0 and grads["euler"][centre] == grads["euler"][far]


def test_cldice_term_moves_connectivity_towards_the_target():
    """From the blurred start (chi -4, target -16) the skeleton term alone, with no volume
    or Euler term, brings chi and BV/TV closer (to -9 and 0.20 in 60 steps)."""
    only = {k: 0.0 for k in ("bvtv", "thickness", "spacing", "euler", "fabric")}
    want, start, end = _descend({**only, "cldice": 1.0})
    assert abs(end["chi"] - want["chi"]) < 0.8 * abs(start["chi"] - want["chi"])
    assert abs(end["bv_tv"] - want["bv_tv"]) < 0.5 * abs(start["bv_tv"] - want["bv_tv"])


@pytest.fixture(scope="module")
def regressor_2d(tmp_path_factory):
    from bone3d.losses.regressor import fit_regressor, save_regressor

    vols = []
    for s, (bv, th) in enumerate([(0.1, 0.12), (0.25, 0.2), (0.18, 0.15)]):
        ph = make_phantom(shape=(48, 48, 48), bv_tv=bv, tb_th_mm=th, seed=s)
        vols.append((ph.image.data[0].numpy() + 200) / 1400)  # the bundles' [0, 1] window
    model, report = fit_regressor(
        vols, (0.05,) * 3, spatial_dims=2, patch=32, n_patches=96, steps=150
    )
    path = save_regressor(model, tmp_path_factory.mktemp("reg") / "reg.pt", report)
    return model, report, path


def test_regressor_learns_morphometry_of_held_out_patches(regressor_2d):
    _, report, _ = regressor_2d
    r = report["held_out_pearson_r"]
    assert set(r) == {"bv_tv", "tb_th_mm", "tb_sp_mm"}  # what a 2D section defines
    assert r["bv_tv"] > 0.6 and r["tb_th_mm"] > 0.6, r


def test_regressor_labels_at_one_level_hold_no_bone_in_a_marrow_patch():
    """A patch of marrow and noise: its own Otsu threshold cuts the noise and labels specks
    as bone; one level for every patch (a scan's global threshold) labels it empty, and still
    finds the bone of a trabecular patch."""
    from bone3d.losses.regressor import fit_regressor, patch_morphometry

    rng = np.random.default_rng(0)
    marrow = (200 / 1400 + rng.normal(0, 0.03, (24, 24, 24))).astype(np.float32)
    sp = (0.05,) * 3
    own = patch_morphometry(marrow, sp)
    fixed = patch_morphometry(marrow, sp, level=0.5)
    assert own[0] > 0.3  # Otsu halves the noise
    assert fixed[0] == 0.0 and fixed[1] == 0.0  # no bone
    # Conn.D: BoneJ's (1 - chi) / V of an empty stack, 1 / 1.728 mm^3, against the specks' 500
    assert fixed[3] == pytest.approx(1 / 1.2**3, rel=1e-4) and own[3] > 100
    ph = make_phantom(shape=(24, 24, 24), bv_tv=0.2, seed=3)
    bone = (ph.image.data[0].numpy() + 200) / 1400
    at_level = patch_morphometry(bone, sp, level=0.5)
    assert at_level[0] == pytest.approx(float((bone > 0.5).mean()))
    assert 0.1 < at_level[0] < 0.35 and at_level[1] > 0
    with pytest.raises(ValueError, match="inside the"):
        fit_regressor([bone], sp, level=1.5)


def test_regressor_loss_is_frozen_and_differentiable(regressor_2d):
    from bone3d.losses.regressor import RegressorLoss, load_regressor

    model, _, path = regressor_2d
    ph = make_phantom(shape=(40, 40, 40), seed=9)
    y = torch.from_numpy((ph.image.data[0].numpy()[:, :, :2].transpose(2, 0, 1) + 200) / 1400)
    y = y[None].float()  # (1, 2, 40, 40): two HR slices as channels
    x = torch.from_numpy(ndi.gaussian_filter(y.numpy(), (0, 0, 1.5, 1.5))).requires_grad_()
    loss = RegressorLoss(path)
    assert float(loss(y, y)) == 0.0
    value = loss(x, y)
    value.backward()
    assert float(value.detach()) > 0 and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.regressor.parameters())
    with torch.no_grad():  # the file round-trips
        torch.testing.assert_close(load_regressor(path)(y[:, :1]), model(y[:, :1]))
    with pytest.raises(ValueError, match="2D regressor"):
        loss(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="needs a regressor file"):
        MorphometryLoss(weights={"regressor": 1.0})
    both = MorphometryLoss(weights={"regressor": 1.0}, regressor=str(path))
    both(x, y)
    assert both.terms["regressor"] == pytest.approx(float(value.detach()), rel=1e-5)


def test_fit_regressor_command(tmp_path, capsys):
    from bone3d.cli import main
    from bone3d.data.datalist import hr_bone_level
    from bone3d.data.prepare import prepare
    from bone3d.losses.regressor import load_regressor

    dl = prepare(tmp_path / "data", phantoms=3, phantom_shape=(40, 40, 40), progress=False)
    out = tmp_path / "reg.pt"
    assert main(["fit-regressor", "--datalist", str(tmp_path / "nope.json"), "-o", str(out)]) == 2
    assert "datalist not found" in capsys.readouterr().err
    assert main(["fit-regressor", "--datalist", str(dl), "-o", str(out), "--patch", "64"]) == 2
    assert "at least 64 voxels" in capsys.readouterr().err and not out.exists()
    args = ["--spatial-dims", "2", "--patch", "32", "--patches", "40", "--steps", "20"]
    assert main(["fit-regressor", "--datalist", str(dl), "-o", str(out), *args]) == 0
    assert "held-out Pearson R: bv_tv" in capsys.readouterr().out
    assert load_regressor(out).spatial_dims == 2
    assert torch.load(out, weights_only=True)["report"]["label_level"] == "patch otsu"
    # labels at one level for every patch: the training HR volumes' pooled IsoData
    out2 = tmp_path / "reg_level.pt"
    assert main(["fit-regressor", "--datalist", str(dl), "-o", str(out2), *args,
                 "--level", "isodata"]) == 0  # fmt: skip
    level = torch.load(out2, weights_only=True)["report"]["label_level"]
    assert level == pytest.approx(hr_bone_level(dl)) and 0.0 < level < 1.0
    capsys.readouterr()
    assert main(["fit-regressor", "--datalist", str(dl), "-o", str(out2), "--level", "high"]) == 2
    assert "otsu, isodata or a number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "iterations, pretrain, epochs, ramps",
    [
        (4, 0.0, 1, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
        # 2 epochs of 5: 10 iterations, the first 4 on the pixel loss alone, then a 2-step ramp
        (2, 0.4, 2, [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_warmup_ramps_the_morphometric_terms_only(iterations, pretrain, epochs, ramps):
    from ignite.engine import Engine

    from bone3d.losses import MorphometryWarmup

    y = _random_soft((1, 1, 12, 12, 12), 6).float()
    x = y.flip(-1)
    loss = MorphometryLoss()
    full = float(loss(x, y))
    pixel = loss.terms["pixel"]
    seen = []
    engine = Engine(lambda e, _: seen.append((loss.ramp, float(loss(x, y)))))
    warm = MorphometryWarmup(loss, iterations=iterations, pretrain=pretrain)
    warm.attach(engine)
    engine.run(range(len(ramps) // epochs), max_epochs=epochs)
    assert warm.delay(engine) == round(pretrain * len(ramps))
    assert [r for r, _ in seen] == ramps
    assert seen[0][1] == pytest.approx(pixel)  # first iteration: the pixel loss alone
    assert seen[-1][1] == pytest.approx(full) and full > pixel
    # at every iteration: the pixel loss plus the ramp times the morphometric terms
    assert [v for _, v in seen] == pytest.approx([pixel + r * (full - pixel) for r, _ in seen])


def test_warmup_rejects_a_pretrain_outside_the_run():
    from bone3d.losses import MorphometryWarmup

    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="pretrain"):
            MorphometryWarmup(MorphometryLoss(), iterations=2, pretrain=bad)


def test_pretraining_computes_the_pixel_loss_alone():
    """While the ramp is 0 (`MorphometryWarmup` pre-training) the loss, its gradient and its
    logged terms are the pixel loss's; at a small ramp the terms are back."""
    y = _random_soft((1, 1, 12, 12, 12), 7).float()
    x = y.flip(-2).clone().requires_grad_(True)
    loss = MorphometryLoss(weights={"pixel": 2.0})
    loss.ramp = 0.0
    value = loss(x, y)
    (grad,) = torch.autograd.grad(value, x)
    ref = 2.0 * F.l1_loss(x, y)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert set(loss.terms) == {"pixel"}
    assert float(value.detach()) == pytest.approx(float(ref.detach()))
    assert torch.equal(grad, ref_grad)
    loss.ramp = 1e-3
    (small,) = torch.autograd.grad(loss(x, y), x)
    assert set(loss.terms) == {"pixel", "bvtv", "thickness", "spacing", "euler", "fabric"}
    assert not torch.equal(small, ref_grad)


def test_density_term_charges_an_offset_that_the_soft_masks_barely_see():
    """class_means with a binary mask are the plain means inside and outside it; a uniform lift
    c of the prediction costs the density term 2|c| (bone and marrow), with slope 2 sign(c),
    while the BV/TV term moves far less: the drift RCAN took under the loss."""
    hr = make_phantom(shape=(24, 24, 24), seed=5).image.data[0].numpy() / 1000.0
    y = _t(hr)
    mask = hr > 0.4
    bone, marrow = class_means(y, _t(mask))
    assert float(bone) == pytest.approx(hr[mask].mean()) and float(marrow) == pytest.approx(
        hr[~mask].mean()
    )
    loss = MorphometryLoss(weights={"density": 1.0}, temperature=0.05)
    for c in (0.05, -0.08):
        lift = torch.tensor(c, dtype=torch.float64, requires_grad=True)
        loss(y + lift, y)
        assert loss.terms["density"] == pytest.approx(2 * abs(c), rel=1e-6)
        assert loss.terms["density"] > 5 * loss.terms["bvtv"]
        only = MorphometryLoss(
            weights=dict.fromkeys(MorphometryLoss.DEFAULT_WEIGHTS, 0.0) | {"density": 1.0}
        )
        only(y + lift, y).backward()
        assert float(lift.grad) == pytest.approx(2 * np.sign(c), rel=1e-6)
    assert MorphometryLoss().weights["density"] == 0.0  # off unless a bundle asks for it
