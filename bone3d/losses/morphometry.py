"""Differentiable surrogates of bone morphometry, to train generators for morphometric fidelity.

Morphometry (BV/TV, Tb.Th, Tb.Sp, Conn.D) is computed on a *binary* segmentation, so it has no
gradient. Each term here replaces the hard threshold with a soft bone probability
``p = sigmoid((x - t) / tau)`` and measures, with operations that reduce to the exact discrete
definitions when ``p`` is binary:

* **BV/TV** (Bouxsein et al. 2010): the mean of ``p`` over the patch (soft voxel counting).
* **Thickness and spacing**: the *granulometry* of the bone phase ``p`` (Tb.Th) and of the marrow
  phase ``1 - p`` (Tb.Sp) (Serra 1982). A morphological opening by a ball of diameter d keeps
  exactly the voxels whose local thickness (Hildebrand & Rueegsegger 1997, the largest sphere
  inside the structure that contains the voxel) is at least d, so the opened volume fractions
  V_d / V for d = 3, 5, 7, ... are the cumulative distribution of the local-thickness map, and
  ``1 + 2 * sum_r V_(2r+1) / V`` is its volume-weighted mean in voxels (exact for a binary plate
  of odd thickness, one voxel low for an even one). The ball of radius r is approximated by r
  alternating unit steps of the 6-neighbour cross and the 3^n cube (a digital ball, the
  "octagonal" distance of Rosenfeld & Pfaltz 1968); on soft masks erosion and dilation are min
  and max pooling (grey-scale morphology), which are differentiable almost everywhere. The
  border of the patch is not a boundary (replicate padding), as in BoneJ.
* **Connectivity**: the Euler characteristic chi = V - E + F - C of the cubical complex of closed
  bone voxels (26-connected bone, 6-connected marrow, Odgaard & Gundersen 1993, the convention of
  `bone3d.morphometry.connectivity`), with each cell's presence taken as the probability that at
  least one of its incident voxels is bone, ``1 - prod(1 - p)``. For binary ``p`` it is exactly
  chi (the test checks it against `euler_characteristic`); for soft ``p`` it is a smooth
  surrogate in which a faint isolated speck of probability q counts as about q particles. The
  patch is taken as floating in space (no edge correction): prediction and target are the same
  patch, so the correction would cancel in their difference.
* **Fabric (DA)**: the directional intercept density P_L(v), the number of bone/marrow
  boundaries crossed per unit length of line along v (stereology, Underwood 1970), taken along
  the 13 (3D) or 4 (2D) lattice directions as ``mean |p(x + v) - p(x)| / |v|``: for binary
  ``p`` it is exactly the crossing count per voxel length of the lattice lines. The mean
  intercept length is ``MIL(v) = 1 / P_L(v)`` (BoneJ 2's ParallelLineMIL divides the line
  length by every phase change), so the MIL fabric tensor (Harrigan & Mann 1984), fitted to
  ``1 / MIL(v)^2``, and its DA = 1 - lambda_min / lambda_max are functions of the profile
  ``P_L(v) / mean_v P_L(v)`` alone: two images whose normalised profiles agree have the same
  DA and fabric axes. 13 directions over-determine the 6 unknowns of the 3D tensor.
* **Skeleton coverage** (optional, weight 0 by default): clDice (Shit et al., CVPR 2021), via
  MONAI's `SoftclDiceLoss`: the soft skeleton of each mask (iterated min/max-pool opening, as
  many steps as ``thickness_radius``, the thickest structure's radius) and the share of it that
  the other mask covers. Its sensitivity half is the share of the target's trabecular mid-lines
  that the prediction segments as bone: a trabecula the prediction breaks or leaves below the
  threshold leaves a stretch of the target's skeleton uncovered, whatever its volume. The
  paper shows that for binary masks a perfect clDice implies preserved topology (homotopy
  equivalence, 2D and 3D, under its assumptions on the skeleton). Its value is taken on the
  masks at 0.5 and its gradient on the soft masks, as the Euler term's; unlike the Euler
  term's flip gradient, which sees nothing across a gap longer than one voxel, it pulls every
  voxel of the target's mid-line that the prediction leaves as marrow towards bone.
* **Density** (optional, weight 0 by default): the mean grey value of the bone and of the marrow
  of the *target's* soft segmentation, in prediction and target: the tissue mineral density
  (TMD, the mean density inside the bone mask; Bouxsein et al. 2010, Scanco's Tb.TMD) and its
  marrow counterpart. The soft masks above depend on the prediction's grey values only through
  the threshold, so a generator can satisfy them by lifting every voxel (bone and marrow alike);
  these two means are linear in the prediction and charge an offset at its full size.

No library provides the others on soft masks in PyTorch (MONAI's losses are pixel, perceptual
and segmentation overlaps; clDice is the one topology loss it has, and it is used), hence
hand-written; the pooling is PyTorch's. Every function takes tensors of shape (N, C,
*spatial) with 2 or 3 spatial dimensions.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import SoftclDiceLoss
from torch import nn


def soft_bone(x: torch.Tensor, threshold: float | torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft segmentation ``sigmoid((x - threshold) / temperature)``; same shape as ``x``.

    ``threshold`` may be a float or a tensor broadcastable to ``x`` (one value per image).
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    return torch.sigmoid((x - threshold) / temperature)


def _spatial(p: torch.Tensor) -> int:
    n = p.ndim - 2
    if n not in (2, 3):
        raise ValueError(
            f"expected (N, C, *spatial) with 2 or 3 spatial dims, got {tuple(p.shape)}"
        )
    return n


def soft_bvtv(p: torch.Tensor) -> torch.Tensor:
    """Soft BV/TV: mean bone probability over the spatial dims; (N, C)."""
    n = _spatial(p)
    return p.mean(dim=tuple(range(2, 2 + n)))


def soft_euler(p: torch.Tensor) -> torch.Tensor:
    """Euler characteristic of the soft bone phase, per image; (N, C).

    Cells of the cubical complex are indexed by the set of axes along which they sit on a grid
    plane ("thin" axes); a cell thin along k axes is shared by 2^k voxels and has dimension
    n - k, and enters chi with sign (-1)^(n - k).
    """
    n = _spatial(p)
    q = 1.0 - p
    dims = tuple(range(2, 2 + n))
    chi = torch.zeros(p.shape[:2], dtype=p.dtype, device=p.device)
    for thin in itertools.product((False, True), repeat=n):
        pad = []
        for ax in reversed(range(n)):
            pad += [1, 1] if thin[ax] else [0, 0]
        absent = F.pad(q, pad, value=1.0)  # outside the patch is marrow
        for ax in range(n):
            if thin[ax]:
                d = ax + 2
                length = absent.shape[d]
                absent = absent.narrow(d, 0, length - 1) * absent.narrow(d, 1, length - 1)
        sign = -1.0 if (n - sum(thin)) % 2 else 1.0
        chi = chi + sign * (1.0 - absent).sum(dim=dims)
    return chi


def _pool_axis(p: torch.Tensor, ax: int) -> torch.Tensor:
    """Max over the 3 neighbours along one spatial axis. The pooling's implicit -inf padding
    equals replicate padding here (the window always holds the edge voxel itself), so the
    border is not a boundary."""
    n = p.ndim - 2
    kernel, pad = [1] * n, [0] * n
    kernel[ax], pad[ax] = 3, 1
    pool = F.max_pool3d if n == 3 else F.max_pool2d
    return pool(p, kernel, stride=1, padding=pad)


def _dilate_step(p: torch.Tensor, step: int) -> torch.Tensor:
    """Unit dilation: 6-neighbour cross on even steps, 3^n cube (separable) on odd steps."""
    n = p.ndim - 2
    if step % 2:
        for ax in range(n):
            p = _pool_axis(p, ax)
        return p
    out = p
    for ax in range(n):
        out = torch.maximum(out, _pool_axis(p, ax))
    return out


def granulometry(p: torch.Tensor, max_radius: int) -> torch.Tensor:
    """Opened volume fractions ``mean(open_r(p))`` for r = 1..max_radius; (N, C, max_radius).

    Divided by `soft_bvtv` they are the fraction of the phase whose local thickness is at least
    2r + 1 voxels (see the module docstring).
    """
    n = _spatial(p)
    dims = tuple(range(2, 2 + n))
    out, cur = [], p
    # openings by growing balls: erode incrementally, then dilate back each one
    for r in range(1, max_radius + 1):
        cur = -_dilate_step(-cur, r - 1)
        opened = cur
        for s in reversed(range(r)):
            opened = _dilate_step(opened, s)
        out.append(opened.mean(dim=dims))
    return torch.stack(out, dim=-1)


def soft_thickness(p: torch.Tensor, max_radius: int) -> torch.Tensor:
    """Granulometric mean thickness of the phase ``p`` in voxels, ``1 + 2 sum_r V_r / V``; (N, C).

    Equals the volume-weighted mean local thickness when every structure is at most
    2 * max_radius + 1 voxels thick (odd thicknesses exactly, even ones one voxel low).
    """
    g = granulometry(p, max_radius)
    return 1.0 + 2.0 * g.sum(dim=-1) / soft_bvtv(p).clamp_min(1e-6)


def lattice_directions(spatial_dims: int) -> list[tuple[int, ...]]:
    """One of each +/- pair of the nearest-neighbour lattice directions (components -1, 0, 1):
    13 in 3D, 4 in 2D."""
    out = []
    for v in itertools.product((-1, 0, 1), repeat=spatial_dims):
        first = next((c for c in v if c), 0)
        if first > 0:  # keeps v, drops -v and the zero vector
            out.append(v)
    return out


def intercept_density(p: torch.Tensor) -> torch.Tensor:
    """Boundary crossings per voxel length along each `lattice_directions` vector; (N, C, K).

    ``mean |p(x + v) - p(x)| / |v|`` over the voxel pairs inside the patch; for binary ``p`` it
    is the stereological P_L(v) of the lattice lines (see the module docstring), 1 / MIL(v).
    """
    n = _spatial(p)
    dims = tuple(range(2, 2 + n))
    out = []
    for v in lattice_directions(n):
        a, b = p, p
        for ax, c in enumerate(v):
            if c:
                d, length = ax + 2, p.shape[ax + 2]
                a = a.narrow(d, 1 if c > 0 else 0, length - 1)
                b = b.narrow(d, 0 if c > 0 else 1, length - 1)
        out.append((a - b).abs().mean(dim=dims) / float(np.sqrt(sum(c * c for c in v))))
    return torch.stack(out, dim=-1)


def fabric_profile(p: torch.Tensor) -> torch.Tensor:
    """`intercept_density` divided by its mean over the directions; (N, C, K). It determines
    the MIL fabric tensor up to scale, hence DA and the fabric axes (module docstring)."""
    return _profile(intercept_density(p))


def _profile(pl: torch.Tensor) -> torch.Tensor:
    """Intercept densities (N, C, K) divided by their mean over the K directions."""
    return pl / pl.mean(dim=-1, keepdim=True).clamp_min(1e-6)


def otsu_threshold(images: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold (Otsu 1979, scikit-image) of each image; (N, 1, 1, ...).

    Computed on the detached images: no gradient flows through the level.
    """
    from skimage.filters import threshold_otsu

    values = []
    for t in images.detach().cpu().float().numpy():
        values.append(float(threshold_otsu(t)) if np.ptp(t) > 0 else float(t.flat[0]))
    shape = (images.shape[0],) + (1,) * (images.ndim - 1)
    return torch.tensor(values, dtype=images.dtype, device=images.device).reshape(shape)


def _class_sizes(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(2, h.ndim))
    return h.sum(dims), (1 - h).sum(dims)


def class_means(x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x`` over the bone and over the marrow of the soft segmentation ``h`` (weights
    ``h`` and ``1 - h``), per image: two (N, C) tensors in the units of ``x``. With binary ``h``
    they are the plain means inside and outside the mask (TMD and marrow density when ``x`` is
    in mg HA/cm^3)."""
    dims = tuple(range(2, x.ndim))
    nb, nm = _class_sizes(h)
    return (x * h).sum(dims) / nb.clamp_min(1e-6), (x * (1 - h)).sum(dims) / nm.clamp_min(1e-6)


_PIXEL = {
    "l1": lambda a, b: F.l1_loss(a, b),
    "mse": lambda a, b: F.mse_loss(a, b),
    "charbonnier": lambda a, b: torch.sqrt((a - b) ** 2 + 1e-6).mean(),
}


class MorphometryLoss(nn.Module):
    """Pixel loss plus weighted morphometric terms between prediction and target.

    ``loss = w_pixel * pixel(pred, hr) + w_bvtv * |BV/TV_p - BV/TV_h|
    + w_thickness * sum_r |G_r(p) - G_r(h)| + w_spacing * sum_r |G_r(1-p') - G_r(1-h')|
    + w_euler * 1000 * |chi_p - chi_h| / n_voxels + w_fabric * mean_v |F_v(p) - F_v(h)|
    + w_cldice * clDice(p, h) + w_density * (|TMD(pred) - TMD(hr)| + |MMD(pred) - MMD(hr)|)``
    averaged over images (chi of the masks thresholded at 0.5, with `soft_euler`'s gradient: see
    the module docstring), where p and h are the soft segmentations (`soft_bone`) of prediction
    and target, G_r the `granulometry` volume fractions (p', h': average-pooled, see
    ``spacing_pool``), chi the `soft_euler` characteristic (per 1000 voxels, a connectivity
    density in voxel units), F the `fabric_profile` (taken only on targets that have
    boundaries: a patch of pure marrow has no fabric) and TMD / MMD the `class_means` of bone
    and marrow weighted by the target's soft segmentation h (in intensity units; a class is
    left out of an image where h gives it less than one voxel). Channels are separate images (a
    post-upsampling 2D network predicts several HR slices as channels).

    Args:
        weights: ``pixel``, ``bvtv``, ``thickness``, ``spacing``, ``euler``, ``fabric``,
            ``cldice``, ``density``, ``regressor`` (missing = default).
        pixel: ``"l1"``, ``"mse"`` or ``"charbonnier"``.
        threshold: a float in the network's intensity units, one level for every patch (the
            training HR's IsoData level: `bone3d.data.datalist.hr_bone_level`); ``"otsu"``:
            both images at the target patch's Otsu level (in a patch of marrow alone that
            level cuts the target's noise into bone specks); ``"otsu_each"``: each image at
            its own Otsu level (detached), as morphometry segments every scan at its own
            automatic threshold: a prediction whose grey levels drift then has its faint
            specks and blurred bridges segmented, and penalised, as the evaluation sees them.
        temperature: sigmoid width in intensity units (0.05 for targets windowed to [0, 1]).
        thickness_radius / spacing_radius: largest ball radius probed (voxels): set so that
            2r + 1 covers the thickest trabeculae / widest marrow spaces in a patch. Too small
            a spacing radius makes the term blind to a bone speck in the middle of a wide
            space (balls narrower than the space still fit beside it); the bundles use 16
            (``morphometry_loss_radii``; with ``spacing_pool`` 2, balls up to 17 pooled voxels,
            about 1.7 mm at 50 um).
        spacing_pool: the marrow granulometry is taken on the soft masks average-pooled by this
            factor (radius ``ceil(spacing_radius / spacing_pool)`` there): 8x cheaper in 3D for
            spaces of 10-20 voxels, which survive the pooling.
        regressor: a frozen `bone3d.losses.regressor.MorphometryRegressor` file (``bone3d
            fit-regressor``); its term `RegressorLoss` is weighted by ``weights["regressor"]``.
    """

    DEFAULT_WEIGHTS = {
        "pixel": 1.0, "bvtv": 0.1, "thickness": 0.1, "spacing": 0.1, "euler": 0.01, "fabric": 0.1,
        "cldice": 0.0, "density": 0.0, "regressor": 0.0,
    }  # fmt: skip

    def __init__(
        self,
        weights: dict | None = None,
        pixel: str = "l1",
        threshold: float | str = "otsu",
        temperature: float = 0.05,
        thickness_radius: int = 3,
        spacing_radius: int = 6,
        spacing_pool: int = 2,
        regressor: str | None = None,
    ):
        super().__init__()
        unknown = set(weights or {}) - set(self.DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown loss weights {sorted(unknown)}; known: {list(self.DEFAULT_WEIGHTS)}"
            )
        if pixel not in _PIXEL:
            raise ValueError(f"pixel must be one of {list(_PIXEL)}")
        if isinstance(threshold, str) and threshold not in ("otsu", "otsu_each"):
            raise ValueError("threshold must be a number, 'otsu' or 'otsu_each'")
        self.weights = {**self.DEFAULT_WEIGHTS, **(weights or {})}
        self.pixel = pixel
        self.threshold = threshold
        self.temperature = float(temperature)
        self.thickness_radius = int(thickness_radius)
        self.spacing_radius = int(spacing_radius)
        self.spacing_pool = int(spacing_pool)
        self.terms: dict[str, float] = {}
        self.ramp = 1.0  # factor on every term but the pixel loss (`MorphometryWarmup`)
        if self.weights["regressor"] and not regressor:
            raise ValueError("a 'regressor' weight needs a regressor file (bone3d fit-regressor)")
        self.regressor = None
        if regressor:
            from bone3d.losses.regressor import RegressorLoss

            self.regressor = RegressorLoss(regressor)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        w = self.weights
        terms = {"pixel": _PIXEL[self.pixel](pred, target)}
        if self.ramp == 0.0:
            # pixel pre-training (`MorphometryWarmup`): the terms would enter times 0, so they
            # are not computed (on CPU they cost several times a small 3D U-Net's step on a
            # 32^3 patch); loss and gradient are the same
            self.terms = {"pixel": float(terms["pixel"].detach())}
            return w["pixel"] * terms["pixel"]
        # channels are separate images
        x = pred.reshape(-1, 1, *pred.shape[2:])
        y = target.reshape(-1, 1, *target.shape[2:])
        if self.threshold == "otsu":
            tx = ty = otsu_threshold(y)
        elif self.threshold == "otsu_each":
            tx, ty = otsu_threshold(x), otsu_threshold(y)
        else:
            tx = ty = float(self.threshold)
        p = soft_bone(x, tx, self.temperature)
        h = soft_bone(y, ty, self.temperature).detach()
        if w["bvtv"]:
            terms["bvtv"] = (soft_bvtv(p) - soft_bvtv(h)).abs().mean()
        if w["density"]:
            (bx, mx), (by, my), (nb, nm) = class_means(x, h), class_means(y, h), _class_sizes(h)
            has_b, has_m = (nb >= 1).to(x.dtype), (nm >= 1).to(x.dtype)
            terms["density"] = ((bx - by).abs() * has_b + (mx - my).abs() * has_m).mean()
        if w["thickness"]:
            gp, gh = granulometry(p, self.thickness_radius), granulometry(h, self.thickness_radius)
            terms["thickness"] = (gp - gh).abs().sum(-1).mean()
        if w["spacing"]:
            # marrow spaces are several times wider than trabeculae: probed on the soft masks
            # averaged over blocks of spacing_pool voxels, with radii divided accordingly
            f = self.spacing_pool
            pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
            mp, mh = (pool(1 - a, f, ceil_mode=True) if f > 1 else 1 - a for a in (p, h))
            r = max(1, -(-self.spacing_radius // f))
            terms["spacing"] = (granulometry(mp, r) - granulometry(mh, r)).abs().sum(-1).mean()
        if w["euler"]:
            # straight-through: chi of the hard masks, gradient of soft_euler at that binary
            # point, which (soft_euler being multilinear) is each voxel's exact discrete change
            # of chi when it flips from marrow to bone
            n_vox = float(np.prod(x.shape[2:]))
            hp = (p > 0.5).to(p.dtype) + p - p.detach()
            terms["euler"] = (
                1000.0 * (soft_euler(hp) - soft_euler((h > 0.5).to(h.dtype))).abs().mean() / n_vox
            )
        if w["fabric"]:
            pl_h = intercept_density(h)  # once, for the profile and the has-fabric test
            per_image = (fabric_profile(p) - _profile(pl_h)).abs().mean(-1)
            has_fabric = (pl_h.mean(-1) > 1e-3).to(p.dtype)
            terms["fabric"] = (per_image * has_fabric).sum() / has_fabric.sum().clamp_min(1.0)
        if w["cldice"]:
            # straight-through, as the Euler term: clDice of the masks at 0.5 (0 when they
            # agree), with the soft masks' gradient; skeletons of structures up to
            # thickness_radius voxels thick; the smoothing (one voxel) keeps an image whose
            # skeleton is empty (a marrow patch) finite
            hp = (p > 0.5).to(p.dtype) + p - p.detach()
            cldice = SoftclDiceLoss(iter_=self.thickness_radius)
            terms["cldice"] = cldice(hp, (h > 0.5).to(h.dtype))
        if self.regressor is not None and w["regressor"]:
            terms["regressor"] = self.regressor(pred, target)
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(w[k] * (1.0 if k == "pixel" else self.ramp) * v for k, v in terms.items())


class MorphometryWarmup:
    """Ignite handler: hold the morphometric terms of a `MorphometryLoss` at 0 for the first
    ``pretrain`` fraction of the training's iterations (``max_epochs * epoch_length``: the pixel
    loss alone), then ramp them linearly to their weights over the next ``iterations``.

    Like the pixel-loss pre-training of ESRGAN (Wang et al. 2018), the generator first learns
    the intensity mapping; the morphometric terms are taken on soft masks of the output, which
    mean little before it is bone-like. From a random start they stalled or derailed
    post-upsampling nets and GANs in the fidelity benchmark; pre-training on half the run
    improved the U-Net 3D on both presets there (benchmarks/results/README.md). The factor is a
    function of ``engine.state`` ``iteration``, ``max_epochs`` and ``epoch_length`` alone, which
    a resumed run restores, so it continues the same schedule.
    """

    def __init__(self, loss: MorphometryLoss, iterations: int, pretrain: float = 0.0):
        if iterations < 0:
            raise ValueError("iterations must be >= 0")
        if not 0.0 <= pretrain < 1.0:
            raise ValueError(f"pretrain is a fraction of the training in [0, 1), got {pretrain}")
        self.loss = loss
        self.iterations = int(iterations)
        self.pretrain = float(pretrain)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def delay(self, engine) -> int:
        """Iterations of the pixel loss alone in this training."""
        return int(round(self.pretrain * engine.state.max_epochs * engine.state.epoch_length))

    def __call__(self, engine) -> None:
        done = engine.state.iteration - 1 - self.delay(engine)  # ignite counts this iteration
        if done < 0:
            self.loss.ramp = 0.0
        else:
            self.loss.ramp = 1.0 if self.iterations == 0 else min(1.0, done / self.iterations)
