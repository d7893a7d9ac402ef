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
