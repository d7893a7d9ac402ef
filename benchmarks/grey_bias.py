"""Grey-level bias of the fidelity benchmark's SR volumes: mean SR minus mean HR, in marrow and
in bone, per method and test volume (mg HA/cm^3).

Marrow and bone are HR's two classes at its ImageJ IsoData threshold over the scored region (the
first 88^3 voxels, `fidelity.scored_shape`), the same split the morphometry uses. An offset
common to both classes lifts or lowers every voxel: PSNR pays for it while a segmentation at a
level in between may gain; a negative bone bias with a near-zero marrow bias is blur (partial
volume at thin trabeculae). Reads the SR volumes that ``benchmarks/fidelity.py`` left in its work
folder, so run that first (``--single-pass``: its ``--no-self-ensemble`` volumes).

    .venv/bin/python benchmarks/grey_bias.py --degradation hrpqct
    .venv/bin/python benchmarks/grey_bias.py --work /tmp/trial --methods rcan-3d+morpho
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def class_bias(sr: np.ndarray, hr: np.ndarray, shape) -> tuple[float, float]:
    """(marrow, bone) mean of ``sr - hr`` over the region ``shape`` (from the corner), the
    classes being HR's at its IsoData threshold there."""
    from bone3d.morphometry.thresholds import threshold_value

    cut = tuple(slice(0, n) for n in shape)
    h, s = hr[cut].astype(np.float64), sr[cut].astype(np.float64)
    bone = h > threshold_value(h, "isodata") if np.ptp(h) > 0 else np.zeros(h.shape, bool)
    if bone.all() or not bone.any():
        raise ValueError("HR has one class only in the scored region: no marrow/bone split")
    d = s - h
    return float(d[~bone].mean()), float(d[bone].mean())


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    import fidelity

    from bone3d.data.datalist import read_datalist
    from bone3d.io import read_volume

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(fidelity.RESULTS / "work"))
    ap.add_argument("--degradation", default="hrpqct")
    ap.add_argument("--single-pass", action="store_true", help="the --no-self-ensemble volumes")
    ap.add_argument("--methods", nargs="+", help="default: every method in the folder")
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    args = ap.parse_args(argv)
    root = Path(args.work) / args.degradation
    srs = fidelity.sr_folder(Path(args.work), args.degradation, not args.single_pass)
    if not srs.is_dir():
        print(f"no SR volumes in {srs}: run benchmarks/fidelity.py first", file=sys.stderr)
        return 2
    methods = args.methods or sorted(p.name for p in srs.iterdir() if p.is_dir())
    items = read_datalist(root / "data" / "datalist.json")[args.split]
    print(f"{args.degradation} {args.split}: SR - HR, mean over marrow / bone (mg HA/cm^3)")
    print(
        "method".ljust(26)
        + "".join(i["specimen"].removeprefix("bonebox_").rjust(18) for i in items)
    )
    hrs = [read_volume(i["target"]).data[0].numpy() for i in items]
    for m in methods:
        cells = []
        for item, hr in zip(items, hrs, strict=True):
            f = srs / m / f"{item['specimen']}.nii.gz"
            if not f.is_file():
                cells.append("-".rjust(18))
                continue
            sr = read_volume(f).data[0].numpy()
            marrow, bone = class_bias(sr, hr, fidelity.scored_shape(hr.shape))
            cells.append(f"{marrow:+.0f} / {bone:+.0f}".rjust(18))
        print(m.ljust(26) + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
