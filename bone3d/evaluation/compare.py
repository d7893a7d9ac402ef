"""`bone3d compare`: methods x metrics over an MLflow experiment, with the statistical tests.

Every run of the experiment that holds an ``evaluation/voi_metrics.csv`` artifact (written by
`bone3d evaluate` / `bone3d.evaluation.report.evaluate`) is one method, named by its run name.
From each run it reads:

* the image metrics it logged (``eval_psnr_voi_<method>``, ``eval_ssim_voi_<method>``);
* per sub-VOI, the method's morphometry and the HR values; the per-VOI **absolute relative
  error** |method - HR| / |HR| of each parameter is what methods are compared on. A sub-VOI
  where HR's value is undefined or 0 is left out; one where the method's is undefined (no bone
  to measure) counts as a 100 % error (`bone3d.evaluation.stats.error_pairs`, ``<p>_n_missed``).

For each parameter the table gives the mean absolute relative error of every method and its
Pearson R with HR over the sub-VOIs; across methods, when all runs share the same VOIs (same HR
volume), a Friedman test with Holm-corrected Wilcoxon post-hoc tests on the per-VOI errors
(`bone3d.evaluation.stats.compare_methods`; Kruskal-Wallis with Mann-Whitney U otherwise), and
Steiger's Z between the two best methods' correlations with HR (dependent correlations: both
against the same HR values). The best value of every column is marked with ``*``. The LR input,
present in every evaluation, is listed as its own row (``LR``), so the table shows whether each
method beat it.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from scipy import stats as sps

from bone3d.errors import InputError
from bone3d.evaluation import stats
from bone3d.evaluation.report import LABELS, PARAMS, metric_tag
from bone3d.io import write_csv, write_json


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError("experiment", f"no MLflow experiment named {experiment!r}")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _voi_table(client, run_id: str) -> list[dict] | None:
    names = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    if "evaluation/voi_metrics.csv" not in names:
        return None
    local = client.download_artifacts(run_id, "evaluation/voi_metrics.csv")
    text = Path(local).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def collect(tracking_uri: str, experiment: str) -> dict:
    """Per method: image metrics, and per-VOI values of each parameter with the HR values."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        # MLflow would silently create an empty store here; nothing to compare in it
        raise InputError(tracking_uri, "no such MLflow database")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    methods: dict[str, dict] = {}
    for run in _runs(client, experiment):
        rows = _voi_table(client, run.info.run_id)
        if rows is None:
            continue
        name = run.info.run_name or run.info.run_id
        present = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "HR"]
        blocks = [r for r in rows if r["voi"] != "voi"]
        hr = {r["voi"]: r for r in blocks if r["method"] == "HR"}
        for m in present:
            label = "LR" if m == "LR" else name
            if label == "LR" and label in methods:  # LR appears in every run: keep the first
                continue
            if label in methods:  # two runs with one name stay two rows
                label = f"{name}-{run.info.run_id[:8]}"
            mine = {r["voi"]: r for r in blocks if r["method"] == m}
            vois = sorted(set(mine) & set(hr))
            tag = metric_tag(m)
            methods[label] = {
                "run_id": run.info.run_id,
                "psnr_db": run.data.metrics.get(f"eval_psnr_voi_{tag}"),
                "ssim": run.data.metrics.get(f"eval_ssim_voi_{tag}"),
                "vois": vois,
                "values": {k: [_num(mine[v][k]) for v in vois] for k in PARAMS},
                "hr": {k: [_num(hr[v][k]) for v in vois] for k in PARAMS},
            }
    if len(methods) < 2:
        raise InputError("experiment", f"{experiment!r} holds fewer than two evaluated methods")
    return methods


def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def compare(tracking_uri: str, experiment: str) -> dict:
    """The methods x metrics table and the tests (see module docstring)."""
    methods = collect(tracking_uri, experiment)
    names = list(methods)
    table: dict[str, dict] = {n: {} for n in names}
    tests: dict[str, dict] = {}
    same_vois = len({tuple(methods[n]["vois"]) for n in names}) == 1
    for n in names:
        table[n]["psnr_db"] = methods[n]["psnr_db"]
        table[n]["ssim"] = methods[n]["ssim"]
    for key in PARAMS:
        errors, rs = {}, {}
        for n in names:
            x = np.asarray(methods[n]["values"][key], float)
            y = np.asarray(methods[n]["hr"][key], float)
            xe, ye, missed = stats.error_pairs(x, y)  # an undefined reading: a 100 % miss
            err = np.abs(xe - ye) / np.abs(ye)
            errors[n] = err
            table[n][f"{key}_mare"] = float(err.mean()) if err.size else None
            table[n][f"{key}_n_missed"] = missed
            ok = np.isfinite(x) & np.isfinite(y) & (y != 0)
            r = (
                float(sps.pearsonr(x[ok], y[ok]).statistic)
                if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0
                else None
            )
            rs[n] = r
            table[n][f"{key}_r"] = r
        block: dict = {}
        sizes = {len(e) for e in errors.values()}
        try:
            block["errors"] = stats.compare_methods(errors, paired=same_vois and len(sizes) == 1)
        except (InputError, ValueError) as err:
            block["errors"] = {"skipped": str(err)}
        ranked = sorted((n for n in names if rs[n] is not None), key=lambda n: -rs[n])
        if same_vois and len(ranked) >= 2:
            a, b = ranked[:2]
            xa = np.asarray(methods[a]["values"][key], float)
            xb = np.asarray(methods[b]["values"][key], float)
            ok = np.isfinite(xa) & np.isfinite(xb)
            if ok.sum() >= 4 and np.ptp(xa[ok]) > 0 and np.ptp(xb[ok]) > 0:
                r_ab = float(sps.pearsonr(xa[ok], xb[ok]).statistic)
                block["steiger_best_two"] = {
                    "a": a,
                    "b": b,
                    **stats.steiger_z(rs[a], rs[b], r_ab, int(ok.sum())),
                }
        tests[key] = block
    best = {}
    columns = ["psnr_db", "ssim"] + [f"{k}_{s}" for k in PARAMS for s in ("mare", "r")]
    for col in columns:
        vals = {n: table[n].get(col) for n in names if table[n].get(col) is not None}
        if not vals:
            continue
        higher = col in ("psnr_db", "ssim") or col.endswith("_r")
        best[col] = (max if higher else min)(vals, key=vals.get)
    return {
        "experiment": experiment,
        "methods": names,
        "table": table,
        "best": best,
        "tests": tests,
        "paired": same_vois,
        "conventions": "mare = mean over sub-VOIs of |method - HR| / |HR|, an undefined method "
        "value counted as a 100 % miss (n_missed); r = Pearson R with HR "
        "over sub-VOIs; tests on the per-VOI errors; * marks the best value of a column",
    }


def format_table(result: dict) -> str:
    cols = [("psnr_db", "PSNR"), ("ssim", "SSIM")] + [
        (f"{k}_mare", f"{LABELS[k].split(' ')[0]} err") for k in PARAMS
    ]
    width = max(len(n) for n in result["methods"]) + 2
    lines = [f"{'method':{width}s}" + "".join(f"{h:>13s}" for _, h in cols)]
    for n in result["methods"]:
        cells = []
        for col, _ in cols:
            v = result["table"][n].get(col)
            mark = "*" if result["best"].get(col) == n else " "
            if v is None:
                cells.append(f"{'-':>12s} ")
            elif col.endswith("_mare"):
                cells.append(f"{100 * v:11.1f}%{mark}")
            else:
                cells.append(f"{v:12.4f}{mark}")
        lines.append(f"{n:{width}s}" + "".join(cells))
    lines.append("err = mean absolute relative error vs HR over sub-VOIs; * = best")
    for key, block in result["tests"].items():
        e = block.get("errors", {})
        omni = e.get("friedman") or e.get("kruskal_wallis")
        if omni:
            name = "Friedman" if "friedman" in e else "Kruskal-Wallis"
            lines.append(f"{LABELS[key]}: {name} p = {omni['p']:.3g}")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(result, out / "compare.json")]
    cols = sorted({c for row in result["table"].values() for c in row})
    table = [[n, *[result["table"][n].get(c) for c in cols]] for n in result["methods"]]
    paths.append(write_csv(table, out / "compare.csv", ["method", *cols]))
    return paths
