"""How much the fidelity verdict hangs on the error measure: each method's error as a fraction
of trilinear LR's, per acceptance parameter, under three measures, and the sub-VOI that weighs
most in the issue's measure.

Reads the per-sub-VOI rows of ``benchmarks/fidelity.py`` result files (no volumes, no training;
several files, such as the five outer cross-validation folds, are pooled, each file's rows matched
to its own HR rows, as `verdict_uncertainty` pools them):

* ``mare``: the mean absolute relative error, mean over VOIs of ``|x - y| / |y|`` (x the method's
  value, y HR's), the issue's measure and the benchmark's (`fidelity.summarise`; a VOI where
  HR's value is zero or undefined is left out, and one where the method's is undefined counts
  as a miss, read as 0: `bone3d.evaluation.stats.error_pairs`, in all three measures);
* ``median``: the median of the same ``|x - y| / |y|``, which one VOI cannot move far;
* ``nmae``: the normalised mean absolute error ``sum |x - y| / sum |y|``, the mean absolute error
  in units of HR's mean value (also called WAPE). Where HR's value is near zero in one VOI
  (a Conn.D of 0.02 mm^-3: a fifth of a connection in a 2.2 mm cube) its relative error is a
  division by almost nothing, and ``mare`` can turn on that VOI alone; ``nmae`` weighs each VOI's
  error in the parameter's own units (mm, mm^-3) instead.

Each is printed divided by trilinear LR's on the same VOIs (1.00 = as good as LR; the issue's
targets read ``mare``: at most 0.5 on ``hrpqct``, below 1 on ``mdct``), with the mean over the
five parameters (``mare``'s is the benchmark's "vs LR"), and, per parameter, the VOI with the
largest share of ``mare`` and the ratio without it (LR's ``mare`` over the same VOIs); then, per
measure, the model that the validation rows would choose by it and that model's test ratios. A
check on the measure, like the threshold and Purify rescorings: the headline keeps the issue's
``mare``.

    .venv/bin/python benchmarks/error_measures.py
    .venv/bin/python benchmarks/error_measures.py benchmarks/results/fidelity_seeds.json --split validation
    .venv/bin/python benchmarks/error_measures.py benchmarks/results/cv/sparse2_gan_outer_fold*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bone3d.evaluation.stats import error_pairs, relative_errors

HERE = Path(__file__).resolve().parent
FIDELITY = ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3", "da")  # as fidelity.FIDELITY
MEASURES = ("mare", "median", "nmae")


def measures(x, y) -> dict:
    """``mare``, ``median`` and ``nmae`` of values ``x`` against references ``y`` (1-D, same
    length; zero or NaN in ``y`` left out, NaN in ``x`` read as 0, a miss: `error_pairs`), the
    number of misses, and the index into the kept pairs' original positions of the pair with
    the largest relative error (``worst``) with ``mare`` without it (``mare_without_worst``).
    At least 3 pairs must be kept (`relative_errors`)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    ok = np.flatnonzero(np.isfinite(y) & (y != 0))
    if ok.size == 0:
        raise ValueError("no pair with a non-zero reference")
    xe, ye, missed = error_pairs(x, y)  # the pairs at ``ok``, in order
    e = relative_errors(xe, ye)  # at least 3 pairs, else InputError (a ValueError)
    rel = np.abs(xe - ye) / np.abs(ye)
    k = int(np.argmax(rel))
    return {
        "mare": e["mean_abs_rel_error"],
        "median": e["median_abs_rel_error"],
        "nmae": e["norm_mean_abs_error"],
        "n": int(ok.size),
        "n_missed": missed,
        "worst": int(ok[k]),
        "worst_rel": float(rel[k]),
        "mare_without_worst": float(np.delete(rel, k).mean()),
    }


def ratios(rows: list[dict], degradation: str, split: str) -> dict[str, dict]:
    """Per method (HR and trilinear LR excluded): per parameter the three measures divided by
    trilinear LR's, their means over the five parameters, and the VOI that weighs most in the
    method's ``mare`` with the ratio of both ``mare`` without it (LR's over the same VOIs)."""
    mine = [r for r in rows if r["degradation"] == degradation and r["split"] == split]
    hr = {(r["specimen"], r["voi"]): r for r in mine if r["method"] == "HR"}
    if not hr:
        raise ValueError(f"no HR rows for {degradation} / {split}")
    by: dict[str, list[dict]] = {}
    for r in mine:
        if r["method"] != "HR":
            by.setdefault(r["method"], []).append(r)
    if "LR trilinear" not in by:
        raise ValueError(f"no 'LR trilinear' rows for {degradation} / {split}")

    def of(method: str, p: str, drop=None) -> tuple[dict, list[dict]]:
        rs = [r for r in by[method] if (r["specimen"], r["voi"]) != drop]
        x = [np.nan if r[p] is None else r[p] for r in rs]
        y = [hr[(r["specimen"], r["voi"])][p] for r in rs]
        return measures(x, [np.nan if v is None else v for v in y]), rs

    lr = {p: of("LR trilinear", p)[0] for p in FIDELITY}
    out = {}
    for m in by:
        if m == "LR trilinear":
            continue
        res = {"params": {}}
        for p in FIDELITY:
            s, rs = of(m, p)
            key = (rs[s["worst"]]["specimen"], rs[s["worst"]]["voi"])
            # both without that VOI: the same VOIs on either side of the ratio
            without = s["mare_without_worst"] / of("LR trilinear", p, drop=key)[0]["mare"]
            res["params"][p] = {
                **{f"{k}_vs_lr": s[k] / lr[p][k] for k in MEASURES},
                "worst_voi": "/".join(key),
                "worst_rel": s["worst_rel"],
                "hr_at_worst": hr[key][p],
                "mare_without_worst_vs_lr": float(without),
            }
        for k in MEASURES:
            res[f"{k}_vs_lr"] = float(np.mean([res["params"][p][f"{k}_vs_lr"] for p in FIDELITY]))
        out[m] = res
    return out


def choices(rows: list[dict], degradation: str) -> dict[str, dict]:
    """Per measure: the model with the lowest mean over the five parameters on the validation
    rows (the benchmark's choice when the measure is ``mare``) and its per-parameter ratios to
    LR's on the test rows, which take no part in the choice."""
    val, test = ratios(rows, degradation, "validation"), ratios(rows, degradation, "test")
    models = [m for m in val if m in test and not m.startswith("LR ")]
    if not models:
        raise ValueError(f"no trained model with validation and test rows for {degradation}")
    out = {}
    for k in MEASURES:
        best = min(models, key=lambda m: val[m][f"{k}_vs_lr"])
        out[k] = {
            "best": best,
            "validation": val[best][f"{k}_vs_lr"],
            "test": {p: test[best]["params"][p][f"{k}_vs_lr"] for p in FIDELITY},
        }
    return out


def pooled_rows(paths: list[str]) -> list[dict]:
    """The per-sub-VOI rows of one or more result files. With several files each row's
    specimen is prefixed by its file's position (``"0:bonebox_..."``), so that a method's row
    meets its own file's HR row and a donor in two files counts twice, as two clusters do in
    `verdict_uncertainty`; every file must hold rows."""
    out = []
    for i, path in enumerate(paths):
        rows = json.loads(Path(path).read_text())["rows"]
        if not rows:
            raise ValueError(f"{path} holds no rows")
        if len(paths) > 1:
            rows = [{**r, "specimen": f"{i}:{r['specimen']}"} for r in rows]
        out.extend(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", default=[str(HERE / "results" / "fidelity.json")])
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--methods", nargs="+", help="default: every method in the file")
    args = ap.parse_args(argv)
    try:
        rows = pooled_rows(args.results)
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot read the rows of {' '.join(args.results)}: {e}", file=sys.stderr)
        return 2
    if len(args.results) > 1:
        print(f"{len(args.results)} result files pooled")
    short = {"bv_tv": "BV/TV", "tb_th_mm": "Tb.Th", "tb_sp_mm": "Tb.Sp", "conn_d_per_mm3": "Conn.D", "da": "DA"}  # fmt: skip
    for deg in dict.fromkeys(r["degradation"] for r in rows):
        try:
            res = ratios(rows, deg, args.split)
        except ValueError as e:
            print(f"{deg}: {e}", file=sys.stderr)
            continue
        print(f"\n{deg}, {args.split}: error / trilinear LR's (BV/TV Tb.Th Tb.Sp Conn.D DA; mean)")
        for m, r in res.items():
            if args.methods and m not in args.methods:
                continue
            print(f"  {m}")
            for k in MEASURES:
                vals = " ".join(f"{r['params'][p][f'{k}_vs_lr']:5.2f}" for p in FIDELITY)
                print(f"    {k:7s} {vals}   {r[f'{k}_vs_lr']:5.2f}")
            for p in FIDELITY:
                q = r["params"][p]
                print(
                    f"    {short[p]:6s} worst VOI {q['worst_voi']}: error {100 * q['worst_rel']:.0f} % "
                    f"(HR {q['hr_at_worst']:.3g}); mare without it {q['mare_without_worst_vs_lr']:.2f} of LR's"
                )
        try:
            picks = choices(rows, deg)
        except ValueError as e:  # a file without validation rows, or only baselines
            print(f"  (no choice on validation: {e})")
            continue
        print(f"  {deg}: chosen on validation by each measure, its test ratios")
        for k, c in picks.items():
            vals = " ".join(f"{c['test'][p]:5.2f}" for p in FIDELITY)
            print(f"    {k:7s} {c['best']} (validation {c['validation']:.2f}): {vals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
