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
