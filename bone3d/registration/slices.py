"""2D stacks: slice matching by SIFT keypoints and dynamic time warping, and in-plane alignment.

This is the pairing used by the vertebra studies (clinical CT slices matched to micro-CT slices by
SIFT keypoint distances and dynamic time warping) and the rat study (LR/HR crops aligned by
feature matching and a rotation), for data where no 3D registration is possible.

**Slice matching** (`match_slices`): LR slices are thicker than HR slices (``ratio`` = LR slice
spacing / HR slice spacing). For every HR slice position ``j`` a *virtual LR slice* is made, the
mean of the HR slices inside one LR slice thickness centred at ``j`` (a box slice-sensitivity
profile; for an even number of HR slices its centre lies between two), and every LR slice is resized to the HR in-plane grid. SIFT keypoints
(`skimage.feature.SIFT`, Lowe 2004) are found on both; the cost of pairing LR slice ``i`` with
position ``j`` is the fraction of keypoints *without* a mutual nearest-neighbour match passing
Lowe's ratio test (0.8). A monotone subsequence dynamic-time-warping path through that cost
matrix (`librosa.sequence.dtw` with ``subseq=True``: the LR stack may start and end anywhere in
the HR stack; each step advances one LR slice and ``ratio`` +- 1 HR slices) assigns each LR
slice a centre position; the HR slices within half an LR thickness of it are its pairs.

**In-plane alignment** (`align_inplane`): SIFT keypoints on both images, mutual ratio-test matches,
and a RANSAC similarity transform (`skimage.measure.ransac` with `SimilarityTransform`; scale,
rotation, translation), which maps LR pixel coordinates to HR pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torchio as tio
from scipy import ndimage as ndi

from bone3d.errors import InputError

MIN_SIDE = 48  # SIFT needs a few octaves; smaller slices are upsampled for matching


def _norm(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float64)
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float64)


def _sift(img: np.ndarray):
    from skimage.feature import SIFT

    det = SIFT()
    try:
        det.detect_and_extract(_norm(img))
    except RuntimeError:  # no keypoints at all (blank slice)
        return np.zeros((0, 2)), np.zeros((0, 128), np.uint8)
    return det.keypoints, det.descriptors


def _match(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    from skimage.feature import match_descriptors

    if len(d1) < 2 or len(d2) < 2:
        return np.zeros((0, 2), int)
    return match_descriptors(d1, d2, cross_check=True, max_ratio=0.8)


@dataclass
class SliceMatch:
    """Result of `match_slices`; indices are array indices along the slice axis."""

    centre: np.ndarray  # (n_lr,) HR slice coordinate (float) of each LR slice's centre
    runs: list[list[int]]  # HR slices paired with each LR slice
    cost: np.ndarray  # (n_lr, n_hr) matching cost
    ratio: float

    def pairs(self) -> list[tuple[int, int]]:
        """All (LR slice, HR slice) pairs; an LR slice may pair with several HR slices."""
        return [(i, j) for i, run in enumerate(self.runs) for j in run]


def _slices(image: tio.Image, axis: int) -> np.ndarray:
    arr = image.data[0].numpy().astype(np.float32)
    return np.moveaxis(arr, axis, 0)


def match_slices(lr: tio.Image, hr: tio.Image, axis: int = 2) -> SliceMatch:
    """Match every LR slice to HR slices along ``axis`` (see the module docstring).

    Both stacks must show the same in-plane field of view (align them in-plane first, e.g. with
    `align_inplane`); spacing along ``axis`` gives the thickness ratio.
    """
    import librosa

    lr_sp, hr_sp = float(lr.spacing[axis]), float(hr.spacing[axis])
    ratio = lr_sp / hr_sp
    if ratio < 1:
        raise InputError("lr", f"LR slices ({lr_sp} mm) are thinner than HR slices ({hr_sp} mm)")
    hr_s, lr_s = _slices(hr, axis), _slices(lr, axis)
    if len(lr_s) * ratio > len(hr_s) * 1.5:
        raise InputError("lr", "the LR stack spans far more than the HR stack: nothing to match")
    # virtual LR slices: box average over one LR slice thickness
    width = max(int(round(ratio)), 1)
    virtual = ndi.uniform_filter1d(hr_s, size=width, axis=0, mode="nearest")
    shape = hr_s.shape[1:]
    scale = max(1.0, MIN_SIDE / min(shape))
    target = tuple(int(round(s * scale)) for s in shape)

    def resized(img):
        zoom = [t / s for t, s in zip(target, img.shape, strict=True)]
        return ndi.zoom(img, zoom, order=1) if any(abs(z - 1) > 1e-6 for z in zoom) else img

    feats_hr = [_sift(resized(v)) for v in virtual]
    feats_lr = [_sift(resized(s)) for s in lr_s]
    cost = np.ones((len(lr_s), len(hr_s)))
    for i, (_, di) in enumerate(feats_lr):
        for j, (_, dj) in enumerate(feats_hr):
            n = min(len(di), len(dj))
            if n:
                cost[i, j] = 1.0 - len(_match(di, dj)) / n
    # each step advances one LR slice and about `ratio` HR slices (+-1 for drift in spacing)
    ks = range(max(1, int(np.floor(ratio)) - 1), int(np.ceil(ratio)) + 2)
    steps = np.asarray([[1, k] for k in ks])
    _, path = librosa.sequence.dtw(
        C=cost, subseq=True, step_sizes_sigma=steps, weights_add=np.zeros(len(steps))
    )
    # scipy centres an even-width box at j - 0.5: the virtual slice j stands for that position
    shift = 0.5 if width % 2 == 0 else 0.0
    centre = np.full(len(lr_s), np.nan)
    for i, j in path:
        centre[int(i)] = j - shift
    half = ratio / 2.0
    runs = [[j for j in range(len(hr_s)) if c - half <= j < c + half] for c in centre]
    return SliceMatch(centre=centre, runs=runs, cost=cost, ratio=ratio)


@dataclass
class InplaneAlignment:
    """Similarity transform from LR to HR pixel coordinates, in skimage's (x = column, y = row)."""

    transform: object  # skimage.transform.SimilarityTransform
    matches: int
    inliers: int

    @property
    def scale(self) -> float:
        return float(self.transform.scale)

    @property
    def rotation_deg(self) -> float:
        return float(np.rad2deg(self.transform.rotation))


def align_inplane(lr2d: np.ndarray, hr2d: np.ndarray, seed: int = 0) -> InplaneAlignment:
    """SIFT + RANSAC similarity alignment of an LR crop to an HR crop (2D arrays)."""
    from skimage.measure import ransac
    from skimage.transform import SimilarityTransform

    if lr2d.ndim != 2 or hr2d.ndim != 2:
        raise InputError("image", "align_inplane takes two 2D images")
    k1, d1 = _sift(lr2d)
    k2, d2 = _sift(hr2d)
    m = _match(d1, d2)
    if len(m) < 3:
        raise InputError("image", f"only {len(m)} keypoint matches: cannot align these crops")
    src, dst = k1[m[:, 0]][:, ::-1], k2[m[:, 1]][:, ::-1]  # skimage transforms use (x=col, y=row)
    model, inliers = ransac(
        (src, dst),
        SimilarityTransform,
        min_samples=3,
        residual_threshold=2.0,
        max_trials=2000,
        rng=np.random.default_rng(seed),
    )
    if model is None or inliers is None or inliers.sum() < 3:
        raise InputError("image", "no consistent similarity transform between the crops")
    return InplaneAlignment(transform=model, matches=len(m), inliers=int(inliers.sum()))
