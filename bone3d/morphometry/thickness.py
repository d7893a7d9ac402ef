"""Model-independent local thickness (Hildebrand & Ruegsegger 1997), with BoneJ's conventions.

Definition (Hildebrand T, Ruegsegger P. J Microsc 1997;185:67-75): the local thickness at a
point of a structure is the diameter of the largest sphere that contains the point and fits
inside the structure; Tb.Th is its mean over bone, Tb.Sp the same over marrow.

Discretisation, as in BoneJ / Fiji "Local Thickness" (Dougherty & Kunzelmann 2007), which this
module reproduces step by step:

1. ``R(c)`` = squared Euclidean distance from voxel centre ``c`` to the nearest *background voxel
   centre* (exact EDT, the ``edt`` package). The image border is **not** a boundary (rows with no
   background have no distance from that side); the edge of a VOI **is** (outside the VOI counts
   as background).
2. Each foreground voxel ``c`` is the centre of a ball ``|v - c|^2 <= R(c)`` on the voxel grid;
   every voxel ``v`` (foreground or not) gets ``max R(c)`` over the balls containing it. Only
   "distance ridge" centres need painting: a grid ball contained in a 26-neighbour's grid ball
   adds nothing to the maximum. Containment is tested exactly, with a template of the smallest
   neighbour radius that contains each radius (the test BoneJ's Distance_Ridge makes), so the
   result is the exact maximum over all balls.
3. Thickness = ``2 sqrt(max R)`` voxels. So a plate 4 voxels thick measures exactly 4 and a
   plate 5 voxels thick measures 6 ("odd thickness + 1"), as in BoneJ.
4. BoneJ's clean-up: voxels that touch (26-neighbourhood, inside the image) a voxel with
   thickness 0 take the mean thickness of their 26-neighbours that do not; then the map is masked
   with the original foreground and scaled by the voxel size.

The painting step is hand-written (numba, parallel over (x, y) tiles, each thread writing only
its tile): neither scipy nor porespy computes this maximum exactly (porespy's
``local_thickness`` bins the radii), and it is the step that makes BoneJ slow (minutes, and
over 25 minutes on wide marrow spaces). Balls go in decreasing R, so a voxel's first value is
its maximum; a per-column "next unpainted voxel" index skips painted runs, and the columns
that an earlier same-slice neighbour's ball already covers (a half-plane of the ball's disk
per neighbour, exact in integers) are never visited. Wide marrow spaces then cost about what
typical ones do.

Voxels must be isotropic (BoneJ scales by the pixel width alone); anisotropic spacing raises.
"""

from __future__ import annotations

import math
import os

import edt
import numba
import numpy as np

from bone3d.errors import InputError

_TILE = 32  # (x, y) tile edge for painting, voxels: a tile's columns stay in L2 cache
_THREADS = max(1, min(numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1))

# 26-neighbour offsets and their lengths
_OFFS = np.array(
    [
        (i, j, k)
        for i in (-1, 0, 1)
        for j in (-1, 0, 1)
        for k in (-1, 0, 1)
        if (i, j, k) != (0, 0, 0)
    ],
    dtype=np.int64,
)
_OFFCLASS = (np.abs(_OFFS).sum(1) - 1).astype(np.int64)  # 0 face, 1 edge, 2 corner


@numba.njit(cache=True, nogil=True)
def _isqrt(n):  # pragma: no cover - compiled
    r = int(math.sqrt(n))
    while r * r > n:
        r -= 1
    while (r + 1) * (r + 1) <= n:
        r += 1
    return r


@numba.njit(cache=True, nogil=True)
def _isqrt_table(n):  # pragma: no cover - compiled
    """Integer square roots of 0..n, for look-up."""
    sq = np.empty(n + 1, dtype=np.int32)
    for v in range(n + 1):
        sq[v] = _isqrt(v)
    return sq


@numba.njit(cache=True, parallel=True, nogil=True)
def _containment_template(values, rmax2):  # pragma: no cover - compiled
    """t[c, R] = smallest R' such that the grid ball of radius^2 R' centred at an offset of
    class c (1: face, 2: edge, 3: corner neighbour) contains the grid ball of radius^2 R at the
    origin, i.e. max |v - d|^2 over integer v with |v|^2 <= R (exact enumeration; the maximum
    puts each coordinate on the side away from d)."""
    t = np.full((3, rmax2 + 1), np.iinfo(np.int64).max, dtype=np.int64)
    for ii in numba.prange(values.shape[0]):
        rr = values[ii]
        r = _isqrt(rr)
        for c in range(3):
            dx = 1
            dy = 1 if c >= 1 else 0
            dz = 1 if c >= 2 else 0
            best = 0
            for k in range(r + 1):
                for j in range(r + 1):
                    rem = rr - j * j - k * k
                    if rem < 0:
                        break
                    i = _isqrt(rem) + dx
                    val = i * i + (j + dy) * (j + dy) + (k + dz) * (k + dz)
                    if val > best:
                        best = val
            t[c, rr] = best
    return t


@numba.njit(cache=True, parallel=True, nogil=True)
def _ridge_points(r2, offs, offclass, template, nslab):  # pragma: no cover - compiled
    """Centres whose grid ball is not contained in a 26-neighbour's grid ball (the distance
    ridge); the maximum over the remaining balls equals the maximum over all balls.

    Returns the centres and their R sorted by decreasing R, ties in scan order (a counting
    sort: per-slab histograms give every point its slot, so no index array is needed and
    both passes run in parallel over ``nslab`` slabs of the first axis), and the ridge mask.
    """
    nx, ny, nz = r2.shape
    nv = template.shape[1]
    keep = np.zeros(r2.shape, dtype=np.bool_)
    hist = np.zeros((nslab, nv), dtype=np.int64)
    for s in numba.prange(nslab):
        for x in range(s * nx // nslab, (s + 1) * nx // nslab):
            for y in range(ny):
                for z in range(nz):
                    rc = r2[x, y, z]
                    if rc <= 0:
                        continue
                    ridge = True
                    for n in range(offs.shape[0]):
                        qx, qy, qz = x + offs[n, 0], y + offs[n, 1], z + offs[n, 2]
                        if qx < 0 or qy < 0 or qz < 0 or qx >= nx or qy >= ny or qz >= nz:
                            continue
                        if r2[qx, qy, qz] >= template[offclass[n], rc]:
                            ridge = False
                            break
                    if ridge:
                        keep[x, y, z] = True
                        hist[s, rc] += 1
    pos = np.empty_like(hist)  # first slot of (slab, R): largest R first, then slab order
    acc = 0
    for v in range(nv - 1, -1, -1):
        for s in range(nslab):
            pos[s, v] = acc
            acc += hist[s, v]
    pts = np.empty((acc, 3), dtype=np.int32)
    vals = np.empty(acc, dtype=np.int32)
    for s in numba.prange(nslab):
        for x in range(s * nx // nslab, (s + 1) * nx // nslab):
            for y in range(ny):
                for z in range(nz):
                    if keep[x, y, z]:
                        rc = r2[x, y, z]
                        i = pos[s, rc]
                        pos[s, rc] += 1
                        pts[i, 0] = x
                        pts[i, 1] = y
                        pts[i, 2] = z
                        vals[i] = rc
    return pts, vals, keep


@numba.njit(cache=True, nogil=True)
def _present_values(r2):  # pragma: no cover - compiled
    """Sorted distinct positive values of ``r2`` (without copying or sorting the volume)."""
    top = 0
    for v in r2.ravel():
        if v > top:
            top = v
    seen = np.zeros(top + 1, dtype=np.bool_)
    for v in r2.ravel():
        seen[v] = True
    seen[0] = False
    return np.flatnonzero(seen).astype(np.int64)


@numba.njit(cache=True, nogil=True, inline="always")
def _find(nxt, x, y, z, nz):  # pragma: no cover - compiled
    """First unpainted index >= z in column (x, y) (path halving); nz when none."""
    while z < nz:
        n = nxt[x, y, z]
        if n == z:
            return z
        if n < nz:
            nxt[x, y, z] = nxt[x, y, n]
        z = n
    return nz


# same-slice (e_z = 0) neighbour offsets used to skip already painted columns
_PLANE = np.array(
    [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)], dtype=np.int64
)


@numba.njit(cache=True, nogil=True, inline="always")
def _row_span(dx, ry, bits, slack):  # pragma: no cover - compiled
    """dy range [lo, hi] of the row dx of a ball's disk (half-width ``ry``) that no earlier
    neighbour covers (``bits``/``slack`` from ``_uncovered``); lo > hi when none."""
    lo, hi = -ry, ry
    for k in range(8):
        if not (bits >> k) & 1:
            continue
        ex, ey = -_PLANE[k, 0], -_PLANE[k, 1]
        b = slack[k] - 2 * dx * ex  # covered: 2 dy ey <= b
        if ey == 0:
            if b >= 0:
                return 1, 0
        elif ey > 0:
            lo = max(lo, b // 2 + 1)
        else:
            hi = min(hi, -(b // 2) - 1)
    return lo, hi


@numba.njit(cache=True, parallel=True, nogil=True)
def _uncovered(pts, vals, r2, ridge, sq):  # pragma: no cover - compiled
    """Which columns of each ball are not already painted when the ball's turn comes.

    A same-slice neighbour c' = c - e (e_z = 0) whose ball is fully painted before c covers
    every column (x, y) of c's ball with ``2 (dx e_x + dy e_y) <= R' - R - |e|^2`` (dx, dy
    from c): along the column |v - c'|^2 = |v - c|^2 + 2 (dx e_x + dy e_y) + |e|^2 <= R'.
    c' is painted before c when R' > R (c' lies in a ridge ball of radius >= R' > R), or
    when R' == R and c' is not a ridge point (then a strictly larger ball contains it) or
    comes earlier in scan order.

    Returns, per ball, ``bits`` (bit k: offset ``_PLANE[k]`` covers), ``slack`` (n, 8)
    ``R' - R - |e|^2``, and ``box`` (n, 4): the absolute x and y range of the uncovered
    columns (a convex set: the disk cut by half-planes), empty (x0 > x1) when there are none.
    """
    nx, ny, _ = r2.shape
    n = vals.shape[0]
    bits = np.zeros(n, dtype=np.uint8)
    slack = np.zeros((n, 8), dtype=np.int32)
    box = np.empty((n, 4), dtype=np.int32)
    for i in numba.prange(n):
        cx, cy, cz = pts[i, 0], pts[i, 1], pts[i, 2]
        rr = vals[i]
        m = 0
        for k in range(8):
            ox, oy = _PLANE[k, 0], _PLANE[k, 1]
            qx, qy = cx + ox, cy + oy
            if qx < 0 or qy < 0 or qx >= nx or qy >= ny:
                continue
            rq = r2[qx, qy, cz]
            if rq > rr or (rq == rr and (not ridge[qx, qy, cz] or ox < 0 or (ox == 0 and oy < 0))):
                m |= 1 << k
                slack[i, k] = rq - rr - ox * ox - oy * oy
        bits[i] = m
        r = sq[rr]
        xa, xb = cx - r, cx + r
        for k in (1, 6):  # neighbours along x (e_y = 0) cut whole rows: clip the range first
            if (m >> k) & 1:
                half = slack[i, k] // 2  # covered rows: 2 dx e_x <= slack
                if _PLANE[k, 0] < 0:  # e_x = +1
                    xa = max(xa, cx + half + 1)
                else:
                    xb = min(xb, cx - half - 1)
        x0, x1, y0, y1 = nx, -1, ny, -1
        for x in range(max(0, xa), min(nx - 1, xb) + 1):
            dx = x - cx
            lo, hi = _row_span(dx, sq[rr - dx * dx], m, slack[i])
            lo, hi = max(0, cy + lo), min(ny - 1, cy + hi)
            if lo > hi:
                if x1 >= 0:  # convex: no uncovered row follows an empty one
                    break
                continue
            x0 = min(x0, x)
            x1 = x
            y0 = min(y0, lo)
            y1 = max(y1, hi)
        box[i, 0], box[i, 1], box[i, 2], box[i, 3] = x0, x1, y0, y1
    return bits, slack, box


@numba.njit(cache=True, nogil=True)
def _bucket(box, shape, tile):  # pragma: no cover - compiled
    """Per (x, y) tile, the indices of the balls whose uncovered box reaches it, in order."""
    nx, ny, _ = shape
    tx = (nx + tile - 1) // tile
    ty = (ny + tile - 1) // tile
    counts = np.zeros(tx * ty + 1, dtype=np.int64)
    n = box.shape[0]
    for i in range(n):
        if box[i, 0] > box[i, 1]:
            continue
        for a in range(box[i, 0] // tile, box[i, 1] // tile + 1):
            for b in range(box[i, 2] // tile, box[i, 3] // tile + 1):
                counts[a * ty + b + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    idx = np.empty(starts[-1], dtype=np.int32)
    for i in range(n):
        if box[i, 0] > box[i, 1]:
            continue
        for a in range(box[i, 0] // tile, box[i, 1] // tile + 1):
            for b in range(box[i, 2] // tile, box[i, 3] // tile + 1):
                idx[fill[a * ty + b]] = i
                fill[a * ty + b] += 1
    return starts, idx, tx, ty


@numba.njit(cache=True, parallel=True, nogil=True)
def _paint_chunk(out, nxt, pts, vals, bits, slack, box, tile, sq):  # pragma: no cover - compiled
    """Paint one run of balls (sorted by decreasing R, all after the previous runs) into
    ``out``: out[v] = R(c) for the first ball |v - c|^2 <= R(c) that reaches an unpainted v.

    Balls are processed in decreasing R, so the first value a voxel gets is its maximum; each
    column keeps a "next unpainted voxel" pointer ``nxt`` (union-find with path halving), so a
    ball costs one step per column it spans plus one per voxel it newly paints, instead of
    one per voxel it covers. Columns that an earlier neighbour's ball already covers
    (``_uncovered``) are not visited at all: on the medial sheets of wide marrow spaces that
    is nearly all of each ball. Work is split into (x, y) tiles, each painted by one thread,
    so no two threads write the same voxel and each tile's columns stay in cache.
    """
    nx, ny, nz = out.shape
    starts, idx, tx, ty = _bucket(box, out.shape, tile)
    for t in numba.prange(tx * ty):
        x0 = (t // ty) * tile
        y0 = (t % ty) * tile
        x1 = min(nx, x0 + tile)
        y1 = min(ny, y0 + tile)
        for m in range(starts[t], starts[t + 1]):
            i = idx[m]
            cx, cy, cz = pts[i, 0], pts[i, 1], pts[i, 2]
            rr = vals[i]
            r32 = np.int32(rr)
            for x in range(max(x0, box[i, 0]), min(x1 - 1, box[i, 1]) + 1):
                dx = x - cx
                rem_x = rr - dx * dx
                lo, hi = _row_span(dx, sq[rem_x], bits[i], slack[i])
                for y in range(max(y0, cy + lo), min(y1 - 1, cy + hi) + 1):
                    rz = sq[rem_x - (y - cy) * (y - cy)]
                    lo_z = max(0, cz - rz)
                    hi_z = min(nz - 1, cz + rz)
                    p = _find(nxt, x, y, lo_z, nz)
                    while p <= hi_z:
                        out[x, y, p] = r32
                        nxt[x, y, p] = p + 1
                        p = _find(nxt, x, y, p + 1, nz)
                    if p != lo_z:  # lo_z is painted: jump straight past the run next time
                        nxt[x, y, lo_z] = p


@numba.njit(cache=True, parallel=True, nogil=True)
def _column_index(shape):  # pragma: no cover - compiled
    """nxt[x, y, z] = z: every voxel unpainted."""
    nxt = np.empty(shape, dtype=np.int32)
    for x in numba.prange(shape[0]):
        for y in range(shape[1]):
            for z in range(shape[2]):
                nxt[x, y, z] = z
    return nxt


def _paint(shape, pts, vals, r2, ridge, tile=_TILE, run=None):
    """out[v] = max R(c) over the ridge balls |v - c|^2 <= R(c) (int32, 0 where none).

    ``pts``/``vals`` sorted by decreasing R. The balls are painted in consecutive runs of
    ``run`` balls (default: one per 64 voxels, so the per-ball working arrays stay near
    1 byte per voxel).
    """
    out = np.zeros(shape, dtype=np.int32)
    if len(vals) == 0:
        return out
    nxt = _column_index(shape)
    sq = _isqrt_table(int(vals[0]))
    run = run or max(1, int(np.prod(shape)) // 64)
    for start in range(0, len(vals), run):
        p, v = pts[start : start + run], vals[start : start + run]
        bits, slack, box = _uncovered(p, v, r2, ridge, sq)
        _paint_chunk(out, nxt, p, v, bits, slack, box, tile, sq)
    return out


def _isotropic(spacing) -> float:
    sp = np.asarray(spacing, dtype=float)
    if np.any(sp <= 0) or not np.allclose(sp, sp[0], rtol=1e-3):
        raise InputError(
            "spacing",
            f"local thickness needs isotropic voxels, got {tuple(sp.tolist())} mm; "
            "resample to isotropic voxels first",
        )
    return float(sp[0])


@numba.njit(cache=True, parallel=True, nogil=True)
def _surface(th):  # pragma: no cover - compiled
    """Painted voxels with a 26-neighbour inside the image whose thickness is 0."""
    nx, ny, nz = th.shape
    out = np.zeros(th.shape, dtype=np.bool_)
    for x in numba.prange(nx):
        for y in range(ny):
            for z in range(nz):
                if th[x, y, z] == 0:
                    continue
                done = False
                for i in range(max(0, x - 1), min(nx, x + 2)):
                    for j in range(max(0, y - 1), min(ny, y + 2)):
                        for k in range(max(0, z - 1), min(nz, z + 2)):
                            if th[i, j, k] == 0:
                                out[x, y, z] = True
                                done = True
                                break
                        if done:
                            break
                    if done:
                        break
    return out


@numba.njit(cache=True, parallel=True, nogil=True)
def _clean_up(th):  # pragma: no cover - compiled
    """BoneJ's Clean_Up_Local_Thickness: surface voxels take the mean thickness of their
    interior (painted, non-surface) 26-neighbours, or keep their value when they have none."""
    nx, ny, nz = th.shape
    surface = _surface(th)
    out = th.copy()
    for x in numba.prange(nx):
        for y in range(ny):
            for z in range(nz):
                if not surface[x, y, z]:
                    continue
                acc = 0.0
                cnt = 0
                for i in range(max(0, x - 1), min(nx, x + 2)):
                    for j in range(max(0, y - 1), min(ny, y + 2)):
                        for k in range(max(0, z - 1), min(nz, z + 2)):
                            if th[i, j, k] > 0 and not surface[i, j, k]:
                                acc += th[i, j, k]
                                cnt += 1
                if cnt > 0:
                    out[x, y, z] = acc / cnt
    return out


def local_thickness_map(foreground: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """BoneJ-convention local thickness map (mm) of ``foreground`` (0 outside it).

    Args:
        foreground: 3D boolean array (bone for Tb.Th, marrow for Tb.Sp), already restricted to
            the VOI (outside the VOI must be False: the VOI edge is a boundary).
        spacing: isotropic voxel size in mm.

    Returns:
        float32 array of the same shape, thickness in mm on foreground voxels, 0 elsewhere.
    """
    fg = np.ascontiguousarray(foreground, dtype=bool)
    if fg.ndim != 3:
        raise InputError("foreground", f"expected a 3D array, got {fg.ndim}D")
    vox = _isotropic(spacing)
    if not fg.any():
        return np.zeros(fg.shape, np.float32)
    if fg.all():
        raise InputError("foreground", "no background anywhere: local thickness is undefined")
    r2, pts, vals, ridge = _ridge(fg)
    painted = _paint(fg.shape, pts, vals, r2, ridge)
    del pts, vals, r2, ridge
    thick = np.sqrt(painted, dtype=np.float32)
    del painted
    thick *= np.float32(2.0)
    thick = _clean_up(thick)
    thick[~fg] = 0
    thick *= np.float32(vox)
    return thick


def _ridge(fg: np.ndarray):
    d2 = edt.edtsq(fg, black_border=False, parallel=_THREADS)  # float32, exact integers
    np.rint(d2, out=d2)
    r2 = d2.astype(np.int32)
    del d2
    r2[~fg] = 0
    present = _present_values(r2)
    template = _containment_template(present, int(present.max()))
    pts, vals, ridge = _ridge_points(r2, _OFFS, _OFFCLASS, template, min(r2.shape[0], 4 * _THREADS))
    return r2, pts, vals, ridge


def mid_axes(foreground: np.ndarray) -> np.ndarray:
    """One-voxel-thin mid-axes (medial surfaces and lines) of ``foreground``.

    The distance ridge (centres of balls not contained in a neighbour's ball) is the medial
    set; where it is two voxels thick across an axis (even-thickness structures) the lower
    voxel is dropped (a ridge neighbour of equal or larger distance above it and none below),
    leaving one layer.
    """
    fg = np.ascontiguousarray(foreground, dtype=bool)
    if not fg.any() or fg.all():
        return np.zeros(fg.shape, bool)
    r2, pts, vals, ridge = _ridge(fg)
    rv = np.where(ridge, r2, -1)
    drop = np.zeros(fg.shape, bool)
    n = fg.shape
    for axis in range(3):
        # voxel i is the lower face of a two-voxel layer across this axis: ridge at i+1 with
        # equal or larger distance, and no ridge at i-1 (inside the image)
        mid = [slice(None)] * 3
        up = [slice(None)] * 3
        down = [slice(None)] * 3
        mid[axis], up[axis], down[axis] = (
            slice(1, n[axis] - 1),
            slice(2, None),
            slice(0, n[axis] - 2),
        )
        mid, up, down = tuple(mid), tuple(up), tuple(down)
        drop[mid] |= ridge[mid] & ridge[up] & (rv[up] >= rv[mid]) & ~ridge[down]
    return ridge & ~drop


def thickness_stats(thick: np.ndarray, foreground: np.ndarray) -> dict:
    """Mean, SD (population, as BoneJ) and max of a thickness map over ``foreground`` (mm)."""
    values = thick[np.asarray(foreground, bool)]
    values = values[values > 0]
    if values.size == 0:
        return {"mean": None, "sd": None, "max": None}
    mean = float(values.mean(dtype=np.float64))
    return {
        "mean": mean,
        "sd": float(np.sqrt(np.mean((values.astype(np.float64) - mean) ** 2))),
        "max": float(values.max()),
    }
