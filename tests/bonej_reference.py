"""Literal, slow transcriptions of BoneJ / ImageJ algorithms, used only to check bone3d's fast
implementations on small inputs (BoneJ itself, a Java/Fiji plugin, cannot run here).

Written from the published algorithm descriptions and BoneJ's documented behaviour: no code
is shared with bone3d's implementation.
"""

from __future__ import annotations

import itertools

import numpy as np


def local_thickness(fg: np.ndarray) -> np.ndarray:
    """Hildebrand-Ruegsegger local thickness with BoneJ's discretisation, by brute force.

    EDT to background voxel centres (image border not a boundary) -> every foreground voxel's
    grid ball |v-c|^2 <= R(c) painted with R(c) (max) -> 2 sqrt -> BoneJ clean-up -> masked.
    """
    fg = np.asarray(fg, bool)
    shape = fg.shape
    bg = np.argwhere(~fg)
    r2 = np.zeros(shape, np.int64)
    for c in np.argwhere(fg):
        r2[tuple(c)] = ((bg - c) ** 2).sum(1).min()
    painted = np.zeros(shape, np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for c in np.argwhere(fg):
        rr = r2[tuple(c)]
        inside = ((grid - c) ** 2).sum(-1) <= rr
        painted[inside] = np.maximum(painted[inside], rr)
    return bonej_clean_up(2 * np.sqrt(painted.astype(np.float64)), fg)


def painted_radii(fg: np.ndarray) -> np.ndarray:
    """max R(c) over the grid balls |v - c|^2 <= R(c) of *every* foreground voxel c (R: squared
    distance to the nearest background voxel centre, image border not a boundary), painted
    ball by ball in a window around each centre. Faster than ``local_thickness``'s all-pairs
    loops, so it checks larger volumes with wide spaces; uses scipy's exact EDT."""
    from scipy import ndimage as ndi

    fg = np.asarray(fg, bool)
    r2 = np.rint(ndi.distance_transform_edt(fg) ** 2).astype(np.int64)
    painted = np.zeros(fg.shape, np.int64)
    for c in np.argwhere(fg):
        rr = int(r2[tuple(c)])
        r = int(np.sqrt(rr))
        lo = np.maximum(c - r, 0)
        hi = np.minimum(c + r + 1, fg.shape)
        win = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        g = np.ogrid[win]
        inside = sum((gi - ci) ** 2 for gi, ci in zip(g, c, strict=True)) <= rr
        view = painted[win]
        view[inside] = np.maximum(view[inside], rr)
    return painted


def bonej_clean_up(th: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """BoneJ's Clean_Up_Local_Thickness on a thickness map, then masked with ``fg``."""
    shape = th.shape
    # clean-up: surface = painted voxel with an in-image 26-neighbour of value 0
    offs = [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]

    def neighbours(p):
        for o in offs:
            q = tuple(np.add(p, o))
            if all(0 <= q[i] < shape[i] for i in range(3)):
                yield q

    surface = np.zeros(shape, bool)
    for p in np.argwhere(th > 0):
        p = tuple(p)
        surface[p] = any(th[q] == 0 for q in neighbours(p))
    out = th.copy()
    for p in np.argwhere(surface):
        p = tuple(p)
        vals = [th[q] for q in neighbours(p) if th[q] > 0 and not surface[q]]
        if vals:
            out[p] = float(np.mean(vals))
    out[~fg] = 0
    return out


def imagej_isodata(hist) -> int:
    """ImageJ AutoThresholder.IsoData, line by line (integer means)."""
    data = [int(v) for v in hist]
    g = 0
    for i in range(1, len(data)):
        if data[i] > 0:
            g = i + 1
            break
    while True:
        lo = totl = 0
        for i in range(g + 1):
            totl += data[i]
            lo += data[i] * i
        hi = toth = 0
        for i in range(g + 1, len(data)):
            toth += data[i]
            hi += data[i] * i
        if totl > 0 and toth > 0:
            lo //= totl
            hi //= toth
            if g == int(np.floor((lo + hi) / 2.0 + 0.5)):
                return g
        g += 1
        if g > len(data) - 2:
            return -1


def bonej_anisotropy(
    bone: np.ndarray, directions: int = 300, lines: int = 2500, increment: float = 1.73, seed=0
) -> float:
    """BoneJ 2 "Anisotropy" (ParallelLineMIL), as its documentation and op descriptions state
    it, in plain numpy, for unit voxels (voxel i covers [i, i + 1) on each axis).

    Per random direction u (isotropic): a square plane of side = the image diagonal, centred
    on the image, normal to u, randomly rotated about u, is cut into sqrt(lines)^2 cells; one
    line parallel to u starts at a random point of each cell. Lines are generated (grid after
    grid) until their chords through the image add up to lines x diagonal. Along each chord,
    samples are taken every ``increment`` voxels (BoneJ's minimum, sqrt(3) rounded) from a
    random offset in [0, increment) after the entry point; the voxel is the sample's floor;
    every phase change counts, starting from "background" at the entry. MIL(u) = total chord
    length / total phase changes. The points MIL(u) u are fitted by a general quadric
    (A x^2 + B y^2 + C z^2 + 2D xy + 2E xz + 2F yz + 2G x + 2H y + 2I z = 1, least squares),
    and DA = 1 - lambda_min / lambda_max of its second-order matrix (lambda = 1 / radius^2).
    BoneJ's defaults are 2000 directions and 10000 lines; fewer are used here for speed.
    """
    b = np.asarray(bone, bool)
    rng = np.random.default_rng(seed)
    shape = np.array(b.shape, float)
    diag = float(np.linalg.norm(shape))
    centre = shape / 2.0
    sections = int(np.sqrt(lines))
    goal = lines * diag
    pts = []
    for _ in range(directions):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        helper = np.array([1.0, 0, 0]) if abs(u[0]) < 0.9 else np.array([0, 1.0, 0])
        v = np.cross(u, helper)
        v /= np.linalg.norm(v)
        w = np.cross(u, v)
        ang = rng.random() * 2 * np.pi
        v, w = np.cos(ang) * v + np.sin(ang) * w, -np.sin(ang) * v + np.cos(ang) * w
        total_len, changes = 0.0, 0
        while goal - total_len > 1e-9:
            cells = (np.arange(sections**2)[:, None] // [sections, 1]) % sections
            st = (cells + rng.random((sections**2, 2))) / sections * diag - diag / 2
            origin = centre + st[:, :1] * v + st[:, 1:] * w
            with np.errstate(divide="ignore", invalid="ignore"):
                t0 = (0.0 - origin) / u
                t1 = (shape - origin) / u
            tmin = np.nanmax(np.minimum(t0, t1), axis=1)
            tmax = np.nanmin(np.maximum(t0, t1), axis=1)
            hit = tmax > tmin
            for o, a_, z_ in zip(origin[hit], tmin[hit], tmax[hit], strict=True):
                if goal - total_len <= 1e-9:
                    break
                z_ = min(z_, a_ + goal - total_len)
                start = a_ + rng.random() * increment
                n = int(np.ceil((z_ - start) / increment))
                if n < 1:
                    continue
                p = o + (start + increment * np.arange(n))[:, None] * u
                idx = np.minimum(np.floor(p).astype(int), b.shape - np.ones(3, int))
                val = b[idx[:, 0], idx[:, 1], idx[:, 2]]
                changes += int(val[0]) + int(np.count_nonzero(val[1:] != val[:-1]))
                total_len += z_ - a_
        pts.append(u * total_len / max(changes, 1))
    x, y, z = np.array(pts).T
    design = np.stack(
        [x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z, 2 * x, 2 * y, 2 * z], 1
    )
    coef, *_ = np.linalg.lstsq(design, np.ones(len(x)), rcond=None)
    a, bb, cc, d, e, f = coef[:6]
    evals = np.linalg.eigvalsh(np.array([[a, d, e], [d, bb, f], [e, f, cc]]))
    return float(1 - evals[0] / evals[-1])
