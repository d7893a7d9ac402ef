"""Streaming whole-stack inference: peak memory and wall time, and the sliding-window overhead.

Builds an LR volume whose HR grid is ``--size X Y Z`` (default 512 768 768, the issue's case;
hours on 2 CPU cores with the cpu3d U-Net; try ``--size 128 192 192`` for minutes), runs
``bone3d`` streaming inference into a NIfTI and prints: peak resident memory (ru_maxrss), wall
time, the network's pure forward time for the same number of output voxels (one 64^3 window's
forward time x output voxels / window voxels), the forward time of the windows the sliding
window actually evaluates (with its overlap), and the ratios of the wall time to both.

    .venv/bin/python benchmarks/inference.py [--size 128 192 192] [--overlap 0.25] [--chunk 64]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval

from bone3d.inference import VolumePredictor
from bone3d.io import make_image, write_volume
from bone3d.nets import build


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, nargs=3, default=[512, 768, 768])
    ap.add_argument("--roi", type=int, default=64)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--preset", default="cpu3d")
    args = ap.parse_args()
    hr_sp, lr_sp = 0.05, 0.1
    lr_shape = [s // 2 for s in args.size]
    rng = np.random.default_rng(0)
    lr = make_image(
        rng.standard_normal(lr_shape, dtype=np.float32) * 300 + 700, spacing=(lr_sp,) * 3
    )
    meta = {"lr_range": [-280, 1680], "hr_range": [-200, 1200], "hr_spacing_mm": [hr_sp] * 3}
    net = build("unet", 3, args.preset).eval()
    roi = [args.roi] * 3
    inferer = SlidingWindowInferer(
        roi_size=roi, sw_batch_size=2, overlap=args.overlap, mode="gaussian"
    )
    with tempfile.TemporaryDirectory() as tmp:
        lr_path = write_volume(lr, Path(tmp) / "lr.nii.gz")
        del lr
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        out = VolumePredictor(net, inferer, meta, stream_voxels=0, chunk=args.chunk).run(
            lr_path, Path(tmp) / "sr.nii"
        )
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size_gb = out.stat().st_size / 1e9
    x = torch.rand(2, 1, *roi)
    with torch.no_grad():
        net(x)
        t0 = time.perf_counter()
        for _ in range(3):
            net(x)
        per_window = (time.perf_counter() - t0) / 6
    n_out = int(np.prod(args.size))
    pure = per_window * n_out / args.roi**3
    scan = _get_scan_interval(tuple(args.size), roi, 3, (args.overlap,) * 3)
    n_windows = len(dense_patch_slices(tuple(args.size), roi, scan))
    windows = per_window * n_windows
    print(
        f"output {args.size} ({size_gb:.2f} GB float32), roi {args.roi}^3, overlap {args.overlap}, chunk {args.chunk}"
    )
    print(
        f"peak resident memory: {peak / 1024**2:.2f} GB (before inference {base / 1024**2:.2f} GB)"
    )
    print(f"wall time: {wall:.1f} s")
    print(f"pure forward for the output voxels: {pure:.1f} s -> ratio {wall / pure:.2f}")
    print(
        f"forward of the {n_windows} overlapping windows: {windows:.1f} s -> overhead {wall / windows:.2f}"
    )


if __name__ == "__main__":
    main()
