"""Morphometry speed and memory: bone3d vs porespy (Tb.Th) and scikit-image (chi), side by side.

Prints, for a 256^3 phantom and the 200^3 LHDL micro-CT core (../shared/data, when present),
the wall time and peak resident-memory growth (bytes per voxel) of each metric, the speed ratio
against ``porespy.filters.local_thickness`` and ``skimage.measure.euler_number`` run in the same
process, and the value differences. Also a 256^3 wide-marrow case (BV/TV 0.05 phantom) and its
time relative to the typical 256^3 phantom (target: at most 2x).

    .venv/bin/python benchmarks/morphometry.py [--skip-porespy]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from bone3d.data.phantom import make_phantom
from bone3d.io import read_volume
from bone3d.morphometry import morphometry, segment
from bone3d.morphometry.connectivity import connectivity, euler_characteristic
from bone3d.morphometry.thickness import local_thickness_map, thickness_stats

LHDL = (
    Path(__file__).resolve().parents[2]
    / "shared/data/lhdl_human_trabecular_uct/LHDL_3155_D_4_bc_200cube_19p5um.nii.gz"
)
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def measure(fn, *args, **kwargs):
    """(result, seconds, peak RSS growth in bytes) of fn(*args, **kwargs)."""
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss())
    return res, dt, peak[0] - base


def bench(name: str, bone: np.ndarray, spacing, porespy: bool) -> dict:
    n = bone.size
    print(f"\n== {name}: {bone.shape}, BV/TV {bone.mean():.3f}, voxel {spacing[0] * 1000:.1f} um")
    rows = {}
    for label, fg in (("Tb.Th", bone), ("Tb.Sp", ~bone)):
        m, dt, mem = measure(local_thickness_map, fg, spacing)
        st = thickness_stats(m, fg)
        rows[label] = dt
        print(f"{label:8s} {st['mean']:.4f} mm   {dt:6.2f} s   peak +{mem / n:5.1f} B/voxel")
    res, dt, mem = measure(connectivity, bone, spacing)
    rows["Conn.D"] = dt
    print(
        f"{'Conn.D':8s} {res['conn_d_per_mm3']:.2f} mm^-3 (chi {res['euler']}, dchi {res['delta_chi']})   {dt:6.2f} s   peak +{mem / n:5.1f} B/voxel"
    )
    total = rows["Tb.Th"] + rows["Tb.Sp"] + rows["Conn.D"]
    print(f"Tb.Th + Tb.Sp + Conn.D: {total:.2f} s")
    panel, dt, mem = measure(morphometry, bone, spacing)
    print(
        f"full panel (BV/TV, Tb.Th, Tb.Sp, Tb.N, Conn.D, DA, SMI, BA/TA): {dt:.2f} s, peak +{mem / n:.1f} B/voxel"
    )
    for key in ("da", "da_ratio", "smi", "tb_n_per_mm"):
        print(f"   {key} = {panel[key]:.4f}")
    # side by side with the libraries
    from skimage.measure import euler_number

    chi_sk, dt_sk, _ = measure(euler_number, bone, connectivity=3)
    chi_ours, dt_ours, _ = measure(euler_characteristic, bone)
    print(
        f"chi: bone3d {chi_ours} in {dt_ours:.3f} s | skimage {chi_sk} in {dt_sk:.3f} s | ratio {dt_sk / dt_ours:.1f}x, diff {chi_ours - chi_sk}"
    )
    if porespy:
        import porespy as ps

        lt, dt_ps, mem_ps = measure(ps.filters.local_thickness, bone)
        th_ps = 2 * lt[bone].mean() * spacing[0]
        th_ours = thickness_stats(local_thickness_map(bone, spacing), bone)["mean"]
        print(
            f"Tb.Th: bone3d {th_ours:.4f} mm in {rows['Tb.Th']:.2f} s | porespy {th_ps:.4f} mm in {dt_ps:.2f} s "
            f"(+{mem_ps / n:.1f} B/voxel) | ratio {dt_ps / rows['Tb.Th']:.1f}x, diff {100 * (th_ps - th_ours) / th_ours:+.1f} %"
        )
    return {"total": total, **rows, "panel": dt}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--skip-porespy", action="store_true")
    args = ap.parse_args()
    # warm the numba caches so compile time is not billed to the first metric
    warm = make_phantom(shape=(24, 24, 24), seed=0).truth.data[0].numpy().astype(bool)
    morphometry(warm, (0.05,) * 3)

    ph = make_phantom(shape=(256, 256, 256), spacing_mm=0.04, bv_tv=0.15, seed=1)
    typical = bench(
        "phantom 256^3", ph.truth.data[0].numpy().astype(bool), (0.04,) * 3, not args.skip_porespy
    )
    if LHDL.exists():
        img = read_volume(LHDL)
        bone, t = segment(img.data[0].numpy(), "isodata")
        print(f"\n(LHDL segmented with ImageJ IsoData at {t:.0f})")
        bench("LHDL core 200^3", bone, tuple(float(s) for s in img.spacing), not args.skip_porespy)
    else:
        print(f"\n{LHDL} not present: LHDL rows skipped")
    # same size as the typical case, so the two times compare like for like
    wide = make_phantom(shape=(256, 256, 256), spacing_mm=0.04, bv_tv=0.05, tb_th_mm=0.12, seed=2)
    w = bench(
        "wide marrow (BV/TV 0.05) 256^3",
        wide.truth.data[0].numpy().astype(bool),
        (0.04,) * 3,
        False,
    )
    print(
        f"\nwide-marrow Tb.Th+Tb.Sp+Conn.D time / typical 256^3 time: {w['total'] / typical['total']:.2f}"
    )


if __name__ == "__main__":
    main()
