"""What does the scanner itself do to each bone parameter? The benchmark's scoring applied to
noise-free references beside trilinear LR and the trained models of ``benchmarks/fidelity.py``
runs.

For each HR volume of a run's split, the benchmark's own scanner model
(`bone3d.data.simulate.degrade`, the degradation's preset with its noise off) makes "HR
blurred" (the PSF alone, on the HR grid) and "LR noise-free" (PSF and LR sampling, trilinear
back onto the HR grid); `conn_d_components.noise_free` makes both. Every volume is then scored
as `fidelity.score_volume` scores a method (ImageJ IsoData once over each volume's scored
region, BoneJ-convention morphometry per 2.2 mm sub-VOI) and summarised by
`fidelity.summarise` (the mean absolute relative error vs HR, MARE, a missed VOI counting as
100 %). Printed per method and parameter: MARE (%), its ratio to trilinear LR's (the issue's
measure) and the median signed relative error (%, method - HR over HR: the direction of the
bias).

The question it answers: how much of LR's error is the blur's, how much the noise's, and do
they cancel? Where the noise's bias offsets the blur's (a parameter that blur pushes one way
and noise the other), LR's error is smaller than either alone, and a target set as a fraction
of LR's error asks a model to beat a noise-free scan of the same PSF by more than that
fraction. These references are what a scan shows when segmented as the benchmark does, not a
bound on what it holds (a model can undo part of the blur). Seconds per volume, no training:

    .venv/bin/python benchmarks/scanner_references.py RESULT.json WORK [RESULT.json WORK ...] \\
        --degradation hrpqct [--split test] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def median_bias(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method and parameter, the median of (method - HR) / HR over the VOIs where both are
    defined and HR's is not zero (the direction of the error; the MARE has no sign)."""
    from fidelity import FIDELITY

    hr = {(r["specimen"], r["voi"]): r for r in rows if r["method"] == "HR"}
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "HR"):
        out[m] = {}
        for p in FIDELITY:
            rel = [
                (r[p] - y) / abs(y)
                for r in rows
                if r["method"] == m
                and r[p] is not None
                and (y := hr[(r["specimen"], r["voi"])][p]) is not None
                and np.isfinite(r[p])
                and y != 0
            ]
            out[m][p] = float(np.median(rel)) if rel else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    from conn_d_components import read_runs, run_volumes, work_parser
    from fidelity import FIDELITY, score_volume, summarise

    ap = work_parser(__doc__)
    args = ap.parse_args(argv)

    def rows_of(result: Path, work: Path) -> list[dict]:
        volumes = run_volumes(result, work, args.degradation, args.split, references=True)
        return [
            {**r, "specimen": spec}
            for spec, hr_img, vols in volumes
            for r in score_volume(vols, hr_img.data[0].numpy())
        ]

    rows = read_runs(ap, args, rows_of)
    summary, bias = summarise(rows), median_bias(rows)
    lr = summary["LR trilinear"]
    n = len({(r["specimen"], r["voi"]) for r in rows if r["method"] == "HR"})
    print(f"{args.degradation}, {args.split}, {n} sub-VOIs: MARE % (/ LR's) [median bias %]")
    print(f"{'method':22s}" + "".join(f"{p:>26s}" for p in FIDELITY))
    for m, s in summary.items():
        cells = ""
        for p in FIDELITY:
            cell = f"{100 * s[f'{p}_mare']:6.1f} ({s[f'{p}_mare'] / lr[f'{p}_mare']:4.2f})"
            cells += f"{cell} [{100 * bias[m][p]:+5.1f}]".rjust(26)
        print(f"{m:22s}{cells}")
    if args.json:
        from bone3d.io import write_json

        write_json(
            {
                m: {**s, **{f"{p}_median_bias": bias[m][p] for p in FIDELITY}}
                for m, s in summary.items()
            },
            args.json,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
