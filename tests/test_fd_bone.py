"""fd_bone: a feature network trained on HR phantoms only; Fréchet distances order degradations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from bone3d.data.phantom import make_phantom
from bone3d.errors import InputError
from bone3d.evaluation.fd_bone import FeatureExtractor, fd_bone, train_feature_net


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    vols = [
        make_phantom(shape=(64, 64, 64), spacing_mm=0.04, tb_th_mm=0.12, seed=s)
        .image.data[0]
        .numpy()
        for s in range(5)
    ]
    path = tmp_path_factory.mktemp("fd") / "fd_bone.pt"
    info = train_feature_net(vols[:3], (-200, 1200), path, steps=150)
    return info, FeatureExtractor(path), vols[3], vols[4]


def test_training_learns_and_saves(trained):
    info, ex, _, _ = trained
    assert info["last_loss"] < 0.3 * info["first_loss"]
    assert len(ex.sha256) == 16


def test_fd_bone_orders_degradations(trained):
    _, ex, ref, other = trained
    rng = np.random.default_rng(0)
    same_domain = fd_bone(other, ref, ex)  # another HR specimen
    mild = fd_bone(ndi.gaussian_filter(other, 1.0), ref, ex)
    strong = fd_bone(ndi.gaussian_filter(other, 2.0), ref, ex)
    noisy = fd_bone(other + rng.normal(0, 150, other.shape), ref, ex)
    assert fd_bone(ref, ref, ex) == pytest.approx(0.0, abs=1e-6)
    assert same_domain < mild < strong
    assert same_domain < noisy


def test_features_are_2p5d_and_deterministic(trained):
    _, ex, ref, _ = trained
    f1, f2 = ex.features(ref), ex.features(ref)
    assert torch.equal(f1, f2)
    assert f1.shape == (3 * 16, 64)  # every 4th slice of 64 along each of 3 axes; 64 features


def test_missing_network_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        FeatureExtractor(tmp_path / "none.pt")


def test_fit_references_and_evaluate_report_them(tmp_path):
    """fit-references on a phantom datalist's training split, then evaluate with them."""
    import json

    import torchio as tio

    from bone3d.cli import main
    from bone3d.data.datalist import datalist_items
    from bone3d.data.prepare import prepare
    from bone3d.evaluation.report import evaluate
    from bone3d.io import read_volume

    dl = prepare(tmp_path / "data", phantoms=4, phantom_shape=(48, 48, 48), progress=False)
    assert (
        main(
            ["fit-references", "--datalist", str(dl), "-o", str(tmp_path / "ref"), "--steps", "40"]
        )
        == 0
    )
    model = json.loads((tmp_path / "ref" / "niqe_uct.json").read_text())
    assert model["source"]["split"] == "training" and model["source"]["volumes"] == 2
    test = datalist_items(dl, "test")[0]
    hr = read_volume(test["target"])
    sr = tio.ScalarImage(
        tensor=torch.from_numpy(ndi.gaussian_filter(hr.data[0].numpy(), 1.0)[None]),
        affine=hr.affine,
    )
    res = evaluate(
        sr, hr, tmp_path / "ev", lr=read_volume(test["image"]), references=tmp_path / "ref"
    )
    im = res["image_metrics"]
    assert im["SR"]["voi"]["fd_bone"] >= 0 and im["LR"]["voi"]["fd_bone"] >= 0
    assert res["reference_metrics"]["HR"]["niqe_uct"] < res["reference_metrics"]["LR"]["niqe_uct"]
