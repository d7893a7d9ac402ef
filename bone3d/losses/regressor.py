"""A frozen morphometry regressor as a loss: the SR study's proposal of a loss "regularised by
morphometric parameters", made differentiable by a network trained in-project.

`MorphometryRegressor` maps a grey patch (N, 1, *spatial), intensities windowed to [0, 1], to the
standardised morphometry of *that patch's own* segmentation: BV/TV, Tb.Th (mm), Tb.Sp (mm) and
Conn.D (mm^-3), measured by `bone3d.morphometry.metrics.morphometry` (BoneJ conventions) after
Otsu's threshold, or after one level for every patch (``level``; `patch_morphometry`).
`fit_regressor` trains it on patches of HR micro-CT *and* of degraded copies (Gaussian blur,
noise), each labelled with its own measurement, so it has seen blurred, thick-looking bone as
well as sharp bone: a regressor that saw only HR could not tell a blurred
prediction from a sharp one. `RegressorLoss` then compares the frozen regressor's outputs on
prediction and target (L1 on standardised values). A 2D regressor (for 2D/2.5D generators)
is trained on slices and predicts what is defined in a section: BA/TA and the in-plane local
thickness of bone (Tb.Th) and marrow (Tb.Sp).

No library offers this (it is the method the SR paper proposed as future work); the network is
MONAI's `Convolution` blocks with global average pooling, so it accepts any patch size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from monai.networks.blocks import Convolution
from scipy import ndimage as ndi
from torch import nn

from bone3d.errors import InputError
from bone3d.io import atomic_path

PARAMETERS = {
    3: ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3"),
    2: ("bv_tv", "tb_th_mm", "tb_sp_mm"),
}


class MorphometryRegressor(nn.Module):
    """Grey patch -> standardised morphometry, for 2 or 3 spatial dims; output (N, P).

    ``mean``/``std`` (buffers) undo the standardisation: ``physical = out * std + mean``.
    """

    def __init__(self, spatial_dims: int = 3, channels=(16, 32, 64, 64)):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.channels = [int(c) for c in channels]
        names = PARAMETERS[spatial_dims]
        layers, c_in = [], 1
        for i, c in enumerate(channels):
            layers.append(
                Convolution(
                    spatial_dims,
                    c_in,
                    c,
                    strides=1 if i == 0 else 2,
                    kernel_size=3,
                    act="LEAKYRELU",
                    norm="INSTANCE",
                )  # fmt: skip
            )
            c_in = c
        self.features = nn.Sequential(*layers)
        pool = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
        self.pool = pool(1)
        self.head = nn.Linear(c_in, len(names))
        self.register_buffer("mean", torch.zeros(len(names)))
        self.register_buffer("std", torch.ones(len(names)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))

    def physical(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted parameters in their units (BV/TV, mm, mm, mm^-3)."""
        return self(x) * self.std + self.mean


def patch_morphometry(patch: np.ndarray, spacing, level: float | None = None) -> np.ndarray:
    """The regressor's targets for one grey patch ([0, 1] window): segmentation at ``level``
    (a grey value of the window), or with ``None`` at the patch's own Otsu threshold, then
    `morphometry` (3D: BV/TV, Tb.Th, Tb.Sp, Conn.D; 2D: BA/TA, Tb.Th, Tb.Sp via a one-slice
    stack, whose local thickness is then the in-plane one).

    A patch's own Otsu threshold always splits it in two: in a patch of marrow alone it cuts
    the noise, and the label is noise specks. One level for every patch (a scan's global
    threshold, as `bone3d.data.datalist.hr_bone_level` gives) labels such a patch as empty."""
    from skimage.filters import threshold_otsu

    from bone3d.morphometry.metrics import morphometry

    if level is not None:
        t = float(level)
    else:
        t = threshold_otsu(patch) if np.ptp(patch) > 0 else np.inf
    bone = patch > t
    if patch.ndim == 2:
        bone = bone[:, :, None]
        spacing = (*spacing[:2], spacing[0])
        metrics = ("bv_tv", "tb_th", "tb_sp")
    else:
        metrics = ("bv_tv", "tb_th", "tb_sp", "connectivity")
    m = morphometry(bone, spacing, metrics=metrics)
    names = PARAMETERS[patch.ndim]
    return np.array([m[k] if m[k] is not None else 0.0 for k in names], np.float32)


def _degrade_patch(p: np.ndarray, rng) -> np.ndarray:
    sigma = rng.uniform(0.0, 2.0)
    out = ndi.gaussian_filter(p, sigma) if sigma > 0.2 else p.copy()
    return (out + rng.normal(0, rng.uniform(0, 0.08), p.shape)).astype(np.float32)


def _sample(volumes, patch: int, spatial_dims: int, n: int, rng) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        v = volumes[rng.integers(len(volumes))]
        if spatial_dims == 3:
            lo = [rng.integers(0, s - patch + 1) for s in v.shape]
            out.append(v[tuple(slice(a, a + patch) for a in lo)])
        else:
            z = rng.integers(v.shape[2])
            lo = [rng.integers(0, s - patch + 1) for s in v.shape[:2]]
            out.append(v[lo[0] : lo[0] + patch, lo[1] : lo[1] + patch, z])
    return out


def fit_regressor(
    volumes: list[np.ndarray],
    spacing,
    *,
    spatial_dims: int = 3,
    patch: int = 32,
    n_patches: int = 384,
    steps: int = 400,
    batch_size: int = 16,
    seed: int = 0,
    level: float | None = None,
) -> tuple[MorphometryRegressor, dict]:
    """Train a regressor on HR volumes (windowed to [0, 1]) and degraded copies of their patches,
    each labelled by `patch_morphometry` at ``level`` (``None``: each patch's own Otsu).

    A fifth of the patches is held out; returns the model (eval mode, frozen) and a report with
    the held-out Pearson R per parameter.
    """
    if level is not None and not 0.0 < level < 1.0:
        raise InputError("level", f"a grey value inside the (0, 1) window, not {level}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if not volumes:
        raise InputError("volumes", "no training volumes")
    for v in volumes:
        if v.ndim != 3 or min(v.shape[:spatial_dims]) < patch:
            raise InputError(
                "volumes", f"need 3D volumes at least {patch} voxels across, got {v.shape}"
            )
    raw = _sample(volumes, patch, spatial_dims, n_patches, rng)
    x = [p if i % 2 == 0 else _degrade_patch(p, rng) for i, p in enumerate(raw)]
    from tqdm import tqdm

    y = np.stack(
        [
            patch_morphometry(p, spacing, level)
            for p in tqdm(x, desc="measuring patches", disable=None)
        ]
    )
    x = torch.from_numpy(np.stack(x)[:, None].astype(np.float32))
    y = torch.from_numpy(y)
    n_val = max(len(x) // 5, 4)
    xt, yt, xv, yv = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    model = MorphometryRegressor(spatial_dims)
    model.mean.copy_(yt.mean(0))
    model.std.copy_(yt.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    target = (yt - model.mean) / model.std
    for _ in tqdm(range(steps), desc="training regressor", disable=None):
        idx = torch.from_numpy(rng.integers(0, len(xt), batch_size))
        xb = xt[idx]
        flips = [d + 2 for d in range(spatial_dims) if rng.random() < 0.5]  # morphometry-invariant
        if flips:
            xb = xb.flip(flips)
        loss = nn.functional.smooth_l1_loss(model(xb), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        pv = model.physical(xv).numpy()
    names = PARAMETERS[spatial_dims]
    r = {k: float(np.corrcoef(pv[:, i], yv[:, i].numpy())[0, 1]) for i, k in enumerate(names)}
    return model, {"held_out_pearson_r": r, "n_train": len(xt), "n_held_out": n_val,
                   "patch": patch, "spatial_dims": spatial_dims, "steps": steps,
                   "label_level": "patch otsu" if level is None else float(level)}  # fmt: skip


def save_regressor(model: MorphometryRegressor, path: str | os.PathLike, report: dict) -> Path:
    """Weights and report in one file (atomic); load with `load_regressor`."""
    with atomic_path(path) as tmp:
        torch.save({"spatial_dims": model.spatial_dims, "channels": model.channels,
                    "state": model.state_dict(), "report": report}, tmp)  # fmt: skip
    return Path(path)


def load_regressor(path: str | os.PathLike) -> MorphometryRegressor:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = MorphometryRegressor(blob["spatial_dims"], blob.get("channels", (16, 32, 64, 64)))
    model.load_state_dict(blob["state"])
    return model.eval().requires_grad_(False)


def frozen_regressor(regressor: MorphometryRegressor | str | os.PathLike) -> MorphometryRegressor:
    """A regressor (module or `save_regressor` file) in eval mode with its weights frozen: the
    fixed judge of `RegressorLoss` and `bone3d.losses.perceptual.PerceptualLoss`."""
    if not isinstance(regressor, nn.Module):
        regressor = load_regressor(regressor)
    return regressor.eval().requires_grad_(False)


class RegressorLoss(nn.Module):
    """Mean |R(pred) - R(target)| over the standardised parameters of a frozen regressor R.

    Channels are separate images; inputs in the network's [0, 1] window, as R was trained.
    """

    def __init__(self, regressor: MorphometryRegressor | str | os.PathLike):
        super().__init__()
        self.regressor = frozen_regressor(regressor)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim - 2 != self.regressor.spatial_dims:
            raise ValueError(
                f"a {self.regressor.spatial_dims}D regressor cannot score {tuple(pred.shape)}"
            )
        x = pred.reshape(-1, 1, *pred.shape[2:])
        y = target.reshape(-1, 1, *target.shape[2:])
        self.regressor.to(x.device)
        return (self.regressor(x) - self.regressor(y).detach()).abs().mean()
