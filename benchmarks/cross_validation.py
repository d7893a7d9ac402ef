"""Donor-wise cross-validation of one setting: the validation rows of several
``benchmarks/fidelity.py`` result files, one per fold, pooled.

The headline split chooses among models on 2 validation donors (11 sub-VOIs), too few to
separate loss settings whose differences are about the spread over training seeds. ``fidelity.py
--fold K`` keeps the 4 test donors and moves validation to the next donors of the same seeded
order (the earlier ones train); the test donors take no part. This script reads one file per
fold (fold 0 may be the headline file or a trial's, whose test rows it ignores) and, for each
method present in every file, prints:

* the pooled validation score: `fidelity.summarise` over the validation sub-VOIs of all folds
  together, each parameter's mean absolute relative error divided by trilinear LR's over the
  same sub-VOIs, and the mean of those five ratios ("vs LR", the benchmark's ranking score);
* each fold's own "vs LR", with their mean and sample SD.

Two settings are compared by running it once per setting on folds of the same split.

    .venv/bin/python benchmarks/cross_validation.py FOLD0.json FOLD1.json FOLD2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402  (the benchmark's own scoring rules)

SHORT = {"bv_tv": "BV/TV", "tb_th_mm": "Tb.Th", "tb_sp_mm": "Tb.Sp", "conn_d_per_mm3": "Conn.D", "da": "DA"}  # fmt: skip


def pool(results: list[dict], degradation: str) -> dict:
    """The folds' validation rows of ``degradation`` pooled (see the module docstring).

    Refuses (ValueError) files whose test donors differ (not folds of one split), a validation
    donor in two files, and a file without validation rows. Returns ``{"donors", "n_voi",
    "methods": {name: {"pooled": summary, "folds": [vs LR per fold], "mean", "sd"}}}``."""
    if len(results) < 2:
        raise ValueError("cross-validation needs at least two fold files")
    tests = {tuple(sorted(r["data"]["split"]["test"])) for r in results}
    if len(tests) != 1:
        raise ValueError("the files hold different test donors: not folds of one split")
    seen: set[str] = set()
    per_fold = []
    for r in results:
        rows = [
            x for x in r["rows"] if x["degradation"] == degradation and x["split"] == "validation"
        ]
        if not rows:
            raise ValueError(f"a file has no {degradation} validation rows")
        donors = {x["specimen"] for x in rows}
        if donors & seen:
            raise ValueError(f"validation donor(s) {sorted(donors & seen)} in two files")
        seen |= donors
        per_fold.append(rows)
    names = [m for m in dict.fromkeys(x["method"] for x in per_fold[0]) if m != "HR"]
    common = [m for m in names if all(any(x["method"] == m for x in rows) for rows in per_fold)]
    keep = {"HR", *common}
    pooled = fidelity.summarise([x for rows in per_fold for x in rows if x["method"] in keep])
    folds = [fidelity.summarise([x for x in rows if x["method"] in keep]) for rows in per_fold]
    out = {}
    for m in common:
        vals = [f[m]["fidelity_vs_lr"] for f in folds]
        out[m] = {"pooled": pooled[m], "folds": vals, "mean": float(np.mean(vals)),
                  "sd": float(np.std(vals, ddof=1))}  # fmt: skip
    n_voi = sum(len({(x["specimen"], x["voi"]) for x in rows}) for rows in per_fold)
    return {"donors": sorted(seen), "n_voi": n_voi, "methods": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="one fidelity.py result file per fold")
    ap.add_argument("--degradation", default="hrpqct")
    args = ap.parse_args(argv)
    try:
        res = pool([json.loads(Path(f).read_text()) for f in args.results], args.degradation)
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot pool {args.results}: {e}", file=sys.stderr)
        return 2
    print(f"{args.degradation}: validation of {len(args.results)} folds, {len(res['donors'])} "
          f"donors, {res['n_voi']} sub-VOIs; error / trilinear LR's")  # fmt: skip
    print(f"{'method':28s}{'PSNR':>7s}" + "".join(f"{SHORT[p]:>8s}" for p in fidelity.FIDELITY)
          + f"{'vs LR':>8s}   per fold (mean +- SD)")  # fmt: skip
    lr = res["methods"].get("LR trilinear", {}).get("pooled")
    for m, r in res["methods"].items():
        s = r["pooled"]
        ratios = "".join(
            f"{s[f'{p}_mare'] / lr[f'{p}_mare']:8.2f}" if lr else f"{'':8s}"
            for p in fidelity.FIDELITY
        )
        folds = " / ".join(f"{v:.3f}" for v in r["folds"])
        print(f"{m:28s}{s['psnr_db']:7.2f}{ratios}{s['fidelity_vs_lr']:8.3f}   {folds} "
              f"({r['mean']:.3f} +- {r['sd']:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
