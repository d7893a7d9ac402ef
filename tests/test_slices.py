"""Slice matching (SIFT + subsequence DTW) and in-plane SIFT/RANSAC alignment with known truth."""

from __future__ import annotations

import numpy as np
import pytest
import torchio as tio
from scipy import ndimage as ndi
from skimage.transform import SimilarityTransform, warp

from bone3d.data.phantom import make_phantom
from bone3d.errors import InputError
from bone3d.registration.slices import align_inplane, match_slices


@pytest.fixture(scope="module")
def hr_stack():
    return make_phantom(shape=(96, 96, 140), spacing_mm=0.04, tb_th_mm=0.12, seed=3).image


def _lr_stack(hr, ratio, z0, n, seed=0):
    """Thick LR slices: box average of `ratio` HR slices from HR slice z0, blurred, noisy, and at
    half the in-plane resolution."""
    a = hr.data[0].numpy()
    rng = np.random.default_rng(seed)
    lr = np.stack([a[:, :, z0 + ratio * i : z0 + ratio * (i + 1)].mean(-1) for i in range(n)], -1)
    lr = ndi.gaussian_filter(lr, (1.5, 1.5, 0)) + rng.normal(0, 40, lr.shape)
    lr = lr[::2, ::2].astype(np.float32)
    sp = float(hr.spacing[0])
    return tio.ScalarImage(tensor=lr[None], affine=np.diag([2 * sp, 2 * sp, ratio * sp, 1.0]))


@pytest.mark.parametrize(("ratio", "z0", "n"), [(4, 9, 28), (3, 20, 35)])
def test_slice_matching_within_one_hr_slice(hr_stack, ratio, z0, n):
    m = match_slices(_lr_stack(hr_stack, ratio, z0, n), hr_stack)
    true_centre = z0 + ratio * np.arange(n) + (ratio - 1) / 2
    err = m.centre - true_centre
    assert np.mean(np.abs(err) <= 1) >= 0.95, np.round(err, 1)
    assert m.ratio == pytest.approx(ratio)
    # each LR slice pairs with about `ratio` HR slices, in order
    assert all(abs(len(run) - ratio) <= 1 for run in m.runs)
    assert np.all(np.diff(m.centre) > 0)


def test_slice_matching_refuses_thin_lr(hr_stack):
    thin = tio.ScalarImage(tensor=hr_stack.data, affine=np.diag([0.04, 0.04, 0.02, 1.0]))
    with pytest.raises(InputError, match="thinner"):
        match_slices(thin, hr_stack)


def test_inplane_alignment_recovers_a_similarity_transform(hr_stack):
    hr2d = hr_stack.data[0, :, :, 70].numpy().astype(np.float64)
    hr2d = ndi.zoom(hr2d, 2, order=1)  # 192 x 192
    # LR crop: HR rotated by 7 degrees, shifted, at half the resolution, blurred and noisy
    truth = SimilarityTransform(scale=2.0, rotation=np.deg2rad(7.0), translation=(20.0, -12.0))
    lr2d = warp(hr2d, truth, output_shape=(80, 80), order=1)  # lr(x) = hr(truth(x))
    lr2d = ndi.gaussian_filter(lr2d, 0.7) + np.random.default_rng(1).normal(0, 20, lr2d.shape)
    found = align_inplane(lr2d, hr2d)
    assert found.inliers >= 10
    assert found.scale == pytest.approx(2.0, rel=0.03)
    assert found.rotation_deg == pytest.approx(7.0, abs=1.0)
    pts = np.array([[0, 0], [79, 0], [0, 79], [79, 79]], float)
    assert np.abs(found.transform(pts) - truth(pts)).max() < 1.5  # HR pixels


def test_inplane_alignment_refuses_3d_and_blank():
    with pytest.raises(InputError, match="2D"):
        align_inplane(np.zeros((8, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(InputError, match="matches"):
        align_inplane(np.zeros((64, 64)), np.ones((64, 64)))
