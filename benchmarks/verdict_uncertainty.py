"""How sure is the fidelity verdict? A donor-level bootstrap of each acceptance ratio.

The issue's error targets compare two means over the test sub-VOIs: a model's mean absolute
relative error (MARE) against HR and trilinear LR's, per parameter, at most 0.5 of LR's
(``hrpqct``) or below it (``mdct``). The test set is 4 donors, 8 sub-VOIs each, and sub-VOIs of
one donor are not independent (one bone, one scan). This script resamples **donors** with
replacement (the cluster bootstrap, Davison & Hinkley 1997, sec. 3.8; every sub-VOI of a drawn
donor enters, as often as the donor is drawn) and recomputes each ratio ``MARE(model) /
MARE(LR)`` over the drawn sub-VOIs, 10 000 times (seeded), and likewise the other two targets,
the PSNR gain over trilinear LR and Pearson R of BV/TV, Tb.Th and Tb.Sp (`other_targets`). Printed per parameter: the ratio on
the data, the 2.5-97.5 % percentile interval, the share of resamples in which the target holds,
the ratio with each donor left out (the jackknife), and, for comparison, the interval of a
bootstrap over sub-VOIs that ignores the donors (narrower, and too narrow where donors differ).

With 4 donors there are only 35 distinct resamples and the interval is coarse: it says how far
the verdict could move with other donors of the same kind, not a calibrated confidence level.
Reads the per-sub-VOI rows of ``benchmarks/fidelity.py`` result files (no volumes, no
training); several files (cross-validation folds, ``--split validation``) are pooled, each
file's donors their own clusters. Errors are the benchmark's (`fidelity.summarise`): a VOI
where HR's value is zero or undefined is left out, one where the method's is undefined counts
as a 100 % error (`bone3d.evaluation.stats.error_pairs`).

    .venv/bin/python benchmarks/verdict_uncertainty.py
    .venv/bin/python benchmarks/verdict_uncertainty.py benchmarks/results/fidelity.json \
        benchmarks/results/cv/default_fold1.json benchmarks/results/cv/default_fold2.json \
        --split validation --degradations hrpqct --method unet_sr-3d+morpho
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bone3d.evaluation.stats import error_pairs

HERE = Path(__file__).resolve().parent
FIDELITY = ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3", "da")  # as fidelity.FIDELITY
TARGET = {"hrpqct": 0.5, "mdct": 1.0}  # the issue's: <= 0.5 x LR's; < LR's
LR = "LR trilinear"


def _donor_rows(rows: list[dict], method: str) -> dict[tuple, dict[str, dict]]:
    """``{(file, specimen): {voi: {"HR": row, LR: row, method: row}}}`` for VOIs all three have."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["method"] in ("HR", LR, method):
            out.setdefault((r["_file"], r["specimen"]), {}).setdefault(r["voi"], {})[
                r["method"]
            ] = r
    return {d: {v: m for v, m in vois.items() if len(m) == 3} for d, vois in out.items()}


def donor_errors(
    rows: list[dict], method: str, param: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per donor (``file:specimen``): the sub-VOI relative errors of ``method`` and of trilinear
    LR against HR, over the same VOIs (those where HR's value is defined and non-zero)."""
    out = {}
    for donor, vois in _donor_rows(rows, method).items():
        if not vois:
            raise ValueError(f"no rows of {method!r} for {donor[1]} in {donor[0]}")
        ms = [vois[v] for v in sorted(vois)]
        y = np.array([m["HR"][param] for m in ms], float)  # None -> NaN
        errs = []
        for name in (method, LR):
            x = np.array([np.nan if m[name][param] is None else m[name][param] for m in ms], float)
            xe, ye, _ = error_pairs(x, y)
            errs.append(np.abs(xe - ye) / np.abs(ye))
        if errs[0].size:
            out[f"{donor[0]}:{donor[1]}"] = (errs[0], errs[1])
    return out


def ratio(errors: list[tuple[np.ndarray, np.ndarray]]) -> float:
    model = np.concatenate([e[0] for e in errors])
    lr = np.concatenate([e[1] for e in errors])
    return float(model.mean() / lr.mean())


def bootstrap(per_donor: dict, target: float, strict: bool, n: int, seed: int) -> dict:
    """The ratio, its donor- and VOI-bootstrap intervals and the share meeting ``target``."""
    donors = list(per_donor)
    sums = np.array([[e[0].sum(), e[1].sum()] for e in per_donor.values()])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(donors), np.full(len(donors), 1.0 / len(donors)), size=n)
    drawn = counts @ sums  # (n, 2): the resamples' summed errors, model and LR (same VOIs)
    by_donor = drawn[:, 0] / drawn[:, 1]
    model = np.concatenate([e[0] for e in per_donor.values()])
    lr = np.concatenate([e[1] for e in per_donor.values()])
    idx = rng.integers(0, model.size, size=(n, model.size))
    by_voi = model[idx].mean(axis=1) / lr[idx].mean(axis=1)
    meets = by_donor < target if strict else by_donor <= target
    return {
        "ratio": ratio(list(per_donor.values())),
        "donor_interval": [
            float(np.percentile(by_donor, 2.5)),
            float(np.percentile(by_donor, 97.5)),
        ],
        "share_meeting_target": float(meets.mean()),
        "voi_interval": [float(np.percentile(by_voi, 2.5)), float(np.percentile(by_voi, 97.5))],
        "leave_one_donor_out": {
            d.split(":", 1)[1]: ratio([per_donor[k] for k in donors if k != d]) for d in donors
        },
        "n_donors": len(donors),
        "n_voi": int(model.size),
    }


def other_targets(rows: list[dict], method: str, n: int, seed: int) -> dict:
    """The same donor bootstrap for the issue's other two targets: the PSNR gain over trilinear
    LR (mean over the sub-VOIs, dB; at least 2) and Pearson R with HR of BV/TV, Tb.Th and Tb.Sp
    (over the sub-VOIs where both values are defined and HR's is non-zero, as
    `fidelity.summarise`; at least 0.95). A draw's R is the Pearson R of the drawn sub-VOIs,
    repeats included, from per-donor sums."""
    per = _donor_rows(rows, method)
    donors = list(per)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(donors), np.full(len(donors), 1.0 / len(donors)), size=n)
    out = {}
    gain = np.array(
        [[sum(m[method]["psnr_db"] - m[LR]["psnr_db"] for m in per[d].values()), len(per[d])]
         for d in donors]
    )  # fmt: skip

    def psnr(c):
        t = c @ gain
        return t[..., 0] / t[..., 1]

    tests = {"psnr_gain_db": (psnr, 2.0)}
    for p in ("bv_tv", "tb_th_mm", "tb_sp_mm"):
        sums = []
        for d in donors:
            xy = np.array(
                [(m[method][p], m["HR"][p]) for m in per[d].values()
                 if m[method][p] is not None and m["HR"][p] not in (None, 0)],
                float,
            ).reshape(-1, 2)  # fmt: skip
            x, y = xy[:, 0], xy[:, 1]
            sums.append([len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
        sums = np.array(sums)

        def pearson(c, sums=sums):
            k, sx, sy, sxx, syy, sxy = np.moveaxis(c @ sums, -1, 0)
            return (k * sxy - sx * sy) / np.sqrt((k * sxx - sx * sx) * (k * syy - sy * sy))

        tests[f"{p}_r"] = (pearson, 0.95)
    ones = np.ones(len(donors))
    for name, (stat, target) in tests.items():
        draws = stat(counts)
        out[name] = {
            "value": float(stat(ones)),
            "donor_interval": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
            "share_meeting_target": float((draws >= target).mean()),
            "target": f">= {target}",
            "leave_one_donor_out": {
                d[1]: float(stat(np.where(np.arange(len(donors)) == i, 0.0, 1.0)))
                for i, d in enumerate(donors)
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("files", nargs="*", type=Path, default=[HERE / "results" / "fidelity.json"])
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--degradations", nargs="+", default=None)
    ap.add_argument("--method", help="default: each degradation's best model in the first file")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.resamples < 100:
        ap.error("--resamples: at least 100")
    results = []
    for f in args.files:
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, ValueError) as err:
            ap.error(f"{f}: not a readable result file ({err})")
    degs = args.degradations or sorted({r["degradation"] for r in results[0]["rows"]})
    report = {}
    for deg in degs:
        rows = [
            {**r, "_file": str(f)}
            for f, res in zip(args.files, results, strict=True)
            for r in res["rows"]
            if r["degradation"] == deg and r["split"] == args.split
        ]
        if not rows:
            print(f"{deg}: no {args.split} rows", file=sys.stderr)
            continue
        method = args.method or results[0].get("acceptance", {}).get(deg, {}).get("best")
        if not method:
            ap.error(f"{deg}: no best model in {args.files[0]}; name one with --method")
        target = TARGET[deg]
        strict = deg != "hrpqct"
        rule = "<= 0.5 x LR" if not strict else "< LR"
        report[deg] = {"method": method, "split": args.split, "target": rule, "params": {}}
        print(f"\n{deg}, {method}, {args.split} ({rule}); ratio = MARE / LR's MARE")
        print(f"{'parameter':16s} {'ratio':>6s} {'donor 95 %':>15s} {'meets':>6s} "
              f"{'VOI 95 %':>15s}  leave one donor out")  # fmt: skip
        for p in FIDELITY:
            try:
                per_donor = donor_errors(rows, method, p)
            except ValueError as err:  # a method the file does not hold: say so, exit 2
                ap.error(str(err))
            b = bootstrap(per_donor, target, strict, args.resamples, args.seed)
            report[deg]["params"][p] = b
            lo, hi = b["donor_interval"]
            vlo, vhi = b["voi_interval"]
            loo = " ".join(f"{v:.2f}" for v in b["leave_one_donor_out"].values())
            print(f"{p:16s} {b['ratio']:6.2f} {f'{lo:.2f}-{hi:.2f}':>15s} "
                  f"{b['share_meeting_target']:6.0%} {f'{vlo:.2f}-{vhi:.2f}':>15s}  {loo}")  # fmt: skip
        report[deg]["other_targets"] = other = other_targets(
            rows, method, args.resamples, args.seed
        )
        print(f"{'other target':16s} {'value':>6s} {'donor 95 %':>15s} {'meets':>6s} "
              f"{'target':>15s}  leave one donor out")  # fmt: skip
        for name, b in other.items():
            lo, hi = b["donor_interval"]
            loo = " ".join(f"{v:.2f}" for v in b["leave_one_donor_out"].values())
            print(f"{name:16s} {b['value']:6.2f} {f'{lo:.2f}-{hi:.2f}':>15s} "
                  f"{b['share_meeting_target']:6.0%} {b['target']:>15s}  {loo}")  # fmt: skip
        n = report[deg]["params"][FIDELITY[0]]
        print(f"({n['n_donors']} donors, {n['n_voi']} sub-VOIs; {args.resamples} resamples)")
    if args.json:
        from bone3d.io import write_json

        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
