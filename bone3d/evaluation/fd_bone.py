"""``fd_bone``: a Fréchet distance over features of a network trained here on HR micro-CT only.

FID (Heusel et al. 2017) compares the Gaussian statistics of Inception-v3 features of two image
sets. Inception's ImageNet weights cannot be downloaded here and were never trained on bone, so
bone3d trains its own feature extractor **on HR micro-CT slices only** (the training split) and
computes the same Fréchet distance (`monai.metrics.FIDMetric`) over its features. The number is
named ``fd_bone`` so it is never mistaken for FID: values are comparable only between runs that
use the same feature network (its file hash is reported).

Feature network: MONAI's 2D `AutoEncoder` (channels 16-32-64, strides 2, instance norm, PReLU),
trained as an autoencoder (reconstruct 48 x 48 HR slice patches; L1 loss; Adam), so its encoder
learns the texture of trabecular micro-CT without any label. (A denoising autoencoder was tried
and rejected: its features became blind to noise, which fd_bone must see.) Features: the encoder's output averaged over space (64 per slice). 2.5D: slices along all
three axes (every ``every``-th), intensities mapped to 0-1 by the HR window.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from bone3d.errors import InputError
from bone3d.evaluation.image import slices_2p5d
from bone3d.io import atomic_path

CHANNELS = (16, 32, 64)


def feature_net():
    from monai.networks.nets import AutoEncoder

    return AutoEncoder(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=CHANNELS,
        strides=(2, 2, 2),
        num_res_units=1,
    )


def _norm(vol, window) -> np.ndarray:
    lo, hi = (float(v) for v in window)
    if hi <= lo:
        raise InputError("window", f"empty intensity window {window}")
    return np.clip((np.asarray(vol, np.float32) - lo) / (hi - lo), 0, 1)


def _slices(vol: np.ndarray, every: int) -> list[np.ndarray]:
    """2.5D slices cropped to multiples of 8 (the encoder's three stride-2 levels)."""
    out = []
    for sl in slices_2p5d(vol, every):
        h, w = (s - s % 8 for s in sl.shape)
        if h >= 16 and w >= 16:
            out.append(sl[:h, :w])
    return out


def train_feature_net(
    hr_volumes,
    window,
    out_path: str | os.PathLike,
    *,
    steps: int = 300,
    patch: int = 48,
    batch: int = 16,
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """Train the denoising autoencoder on random 2D patches of HR volumes; save it atomically."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vols = [_norm(v, window) for v in hr_volumes]
    patch = min(patch, min(min(v.shape) for v in vols) // 8 * 8)  # small volumes: smaller patches
    if patch < 16:
        raise InputError("hr_volumes", "volumes must be at least 16 voxels on every axis")
    net = feature_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    from tqdm import tqdm

    losses = []
    for _ in tqdm(range(steps), desc="fd_bone feature network", unit="step", disable=None):
        items = []
        for _ in range(batch):
            v = vols[rng.integers(len(vols))]
            axis = int(rng.integers(3))
            k = int(rng.integers(v.shape[axis]))
            sl = np.take(v, k, axis=axis)
            i = int(rng.integers(sl.shape[0] - patch + 1))
            j = int(rng.integers(sl.shape[1] - patch + 1))
            items.append(sl[i : i + patch, j : j + patch])
        clean = torch.from_numpy(np.stack(items)[:, None])
        noisy = clean + noise * torch.randn_like(clean)
        loss = torch.nn.functional.l1_loss(net(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out = Path(out_path)
    with atomic_path(out) as tmp:
        torch.save({"state_dict": net.state_dict(), "window": [float(w) for w in window]}, tmp)
    return {"path": str(out), "steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}


class FeatureExtractor:
    """The trained encoder; ``features(volume)`` gives ``(n_slices, 64)``."""

    def __init__(self, path: str | os.PathLike, every: int = 4):
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "fd_bone feature network not found (train it first)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net = feature_net()
        self.net.load_state_dict(state["state_dict"])
        self.net.eval()
        self.window = state["window"]
        self.every = every
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @torch.no_grad()
    def features(self, vol: np.ndarray) -> torch.Tensor:
        feats = []
        for sl in _slices(_norm(vol, self.window), self.every):
            x = torch.from_numpy(np.ascontiguousarray(sl))[None, None]
            z = self.net.encode(x)
            z = self.net.intermediate(z)
            feats.append(z.mean(dim=(2, 3))[0])
        if len(feats) < 2:
            raise InputError("volume", "too few slices for a Fréchet distance")
        return torch.stack(feats).double()


def fd_bone(pred: np.ndarray, ref: np.ndarray, extractor: FeatureExtractor) -> float:
    """Fréchet distance between feature statistics of ``pred`` and ``ref`` slices (MONAI)."""
    from monai.metrics import FIDMetric

    return float(FIDMetric()(extractor.features(pred), extractor.features(ref)).item())
