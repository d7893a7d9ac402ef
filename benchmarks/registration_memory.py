"""Peak memory of registering one pair (`register_pair`, what `bone3d register` runs).

A simulated pair (`bone3d.data.simulate.scan_pair`, the ``hrpqct`` preset by default) with an HR
core of ``--hr-size``^3 voxels at ``--hr-spacing`` mm is registered into a temporary folder while
a thread samples this process's resident set size (RSS) every 2 ms (``measure`` of
``benchmarks/morphometry.py``). Printed: the peak RSS above
the RSS with both scans loaded, in MB and in HR volumes (the HR scan's float32 bytes), and the
wall time. The slab-wise steps (`bone3d.registration.volume.smooth` and ``resample``, the
streamed ``lr_hrgrid``) hold a fixed ~0.5 GB of slab buffers, so the ratio falls towards about
two HR volumes (the smoothed HR and the resampled LR of the QA similarity) as the HR grows.

    .venv/bin/python benchmarks/registration_memory.py [--hr-size 300] [--hr-spacing 0.0205]
        [--preset hrpqct]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import numpy as np

from bone3d.data.phantom import make_phantom
from bone3d.data.simulate import PRESETS, scan_pair
from bone3d.registration.pairing import register_pair

sys.path.insert(0, str(Path(__file__).resolve().parent))
from morphometry import measure  # noqa: E402  (the morphometry benchmark's RSS sampler)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hr-size", type=int, default=300, help="HR core side in voxels")
    ap.add_argument("--hr-spacing", type=float, default=0.0205, help="HR voxel size in mm")
    ap.add_argument("--preset", default="hrpqct", choices=sorted(PRESETS))
    args = ap.parse_args()
    if args.hr_size < 16 or args.hr_spacing <= 0:
        ap.error("--hr-size: at least 16 voxels; --hr-spacing: a positive size in mm")

    side = int(round(args.hr_size * 1.4))  # the specimen the LR scanner sees
    spec = make_phantom(shape=(side,) * 3, spacing_mm=args.hr_spacing, tb_th_mm=0.12, seed=0).image
    pair = scan_pair(spec, args.preset, core_mm=args.hr_size * args.hr_spacing, seed=0)
    hr, lr = pair.hr, pair.lr
    del spec, pair
    gc.collect()
    hr_bytes = int(np.prod(hr.spatial_shape)) * 4
    with tempfile.TemporaryDirectory(prefix="bone3d-regmem-") as out:
        rec, wall, above = measure(register_pair, hr, lr, out, name="memory")
    print(
        f"HR {hr.spatial_shape} ({hr_bytes / 1e6:.0f} MB float32), LR {lr.spatial_shape}, "
        f"{args.preset}; accepted {rec['accepted']}, NCC {rec['similarity_after']['ncc']:.3f}"
    )
    print(
        f"peak RSS above the loaded scans: {above / 1e6:.0f} MB = {above / hr_bytes:.2f} HR "
        f"volumes; wall {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
