"""Blinded reader study: export randomised slices and a score sheet, then analyse returned sheets.

The subjective assessment of the pix2pixHD vertebra study: observers score HR (micro-CT) and
generated (micro-CT-like) slices without knowing which is which, on **contrast** (1-3) and
**noise, sharpness, shadows, trabecular texture** (1-5).

`export_study` picks ``n_slices`` axial slices at the same positions from every HR/generated
volume pair, renders them all with **one** window/level (the 0.5-99.5 percentiles of all HR
slices shown), gives each image a random anonymous ID, shuffles them (seeded), and writes
``images/<id>.png``, a blank ``score_sheet.csv`` for observers and ``key.csv`` (ID -> source,
volume, slice), which stays with the study organiser.

`analyse_study` reads the key and the returned sheets (one per observer, any order of rows),
checks every score is an integer in its range, and reports per criterion:

* **Kendall's W** across observers (raters x images, tie-corrected, chi-square test;
  `bone3d.evaluation.stats.kendalls_w`);
* **Mann-Whitney U** between HR and generated images (two-sided, `scipy.stats.mannwhitneyu`) on
  each image's mean score over observers, so that every image is one independent unit, plus the
  median score of each group.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from scipy import stats as sps

from bone3d.errors import InputError
from bone3d.evaluation.stats import kendalls_w
from bone3d.io import atomic_path, write_csv, write_json

CRITERIA = {
    "contrast": (1, 3),
    "noise": (1, 5),
    "sharpness": (1, 5),
    "shadows": (1, 5),
    "texture": (1, 5),
}


def export_study(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    out_dir: str | os.PathLike,
    *,
    n_slices: int = 5,
    seed: int = 0,
    names: list[str] | None = None,
) -> dict:
    """Write the blinded image set, the blank score sheet and the key.

    Args:
        pairs: ``(hr, generated)`` 3D arrays on one grid, in the same units.
        n_slices: axial slices per volume, evenly spaced through the central 80 %.
        names: volume names for the key (default ``vol0``, ``vol1``...).
    """
    from PIL import Image

    if not pairs:
        raise InputError("pairs", "no volumes to export")
    names = names or [f"vol{i}" for i in range(len(pairs))]
    for (hr, gen), name in zip(pairs, names, strict=True):
        if hr.shape != gen.shape or hr.ndim != 3:
            raise InputError(name, f"HR {hr.shape} and generated {gen.shape} must be one 3D grid")
    images = []
    for (hr, gen), name in zip(pairs, names, strict=True):
        nz = hr.shape[2]
        zs = np.unique(np.linspace(0.1 * nz, 0.9 * nz - 1, n_slices).round().astype(int))
        for z in zs:
            images.append(("HR", name, int(z), hr[:, :, z]))
            images.append(("generated", name, int(z), gen[:, :, z]))
    lo, hi = np.percentile(
        np.concatenate([im[3].ravel() for im in images if im[0] == "HR"]), [0.5, 99.5]
    )
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1000, 10000), size=len(images), replace=False)
    order = rng.permutation(len(images))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    key_rows, sheet_rows = [], []
    for k in order:
        source, name, z, sl = images[k]
        img_id = f"img{ids[k]}"
        grey = np.clip((sl.T[::-1] - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        with atomic_path(out / "images" / f"{img_id}.png") as tmp:
            Image.fromarray(grey).save(tmp, format="PNG")
        key_rows.append([img_id, source, name, z])
        sheet_rows.append([img_id] + [""] * len(CRITERIA))
    write_csv(key_rows, out / "key.csv", ["id", "source", "volume", "slice"])
    write_csv(sheet_rows, out / "score_sheet.csv", ["id", *CRITERIA])
    info = {
        "images": len(images),
        "window": [float(lo), float(hi)],
        "seed": seed,
        "criteria": {k: list(v) for k, v in CRITERIA.items()},
        "instructions": "Score every image on each criterion: contrast 1-3, the others 1-5 "
        "(higher is better). Return score_sheet.csv; key.csv stays with the organiser.",
    }
    write_json(info, out / "study.json")
    return info


def _read_sheet(path: Path, ids: list[str]) -> dict[str, dict[str, int]]:
    if not Path(path).is_file():
        raise InputError(path, "score sheet not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"id", *CRITERIA} <= set(rows[0]):
        raise InputError(path, f"expected columns id,{','.join(CRITERIA)}")
    scores = {}
    for row in rows:
        sc = {}
        for crit, (lo, hi) in CRITERIA.items():
            try:
                v = int(str(row[crit]).strip())
            except ValueError:
                raise InputError(
                    path, f"{row['id']}: {crit} {row[crit]!r} is not a score"
                ) from None
            if not lo <= v <= hi:
                raise InputError(path, f"{row['id']}: {crit} {v} outside {lo}-{hi}")
            sc[crit] = v
        scores[row["id"]] = sc
    missing = sorted(set(ids) - set(scores))
    if missing:
        raise InputError(path, f"no scores for {len(missing)} images, e.g. {missing[:3]}")
    return scores


def analyse_study(key_csv: str | os.PathLike, sheets: list[str | os.PathLike]) -> dict:
    """Kendall's W per criterion across observers; Mann-Whitney HR vs generated per criterion."""
    if not Path(key_csv).is_file():
        raise InputError(key_csv, "key not found")
    with open(key_csv, newline="") as fh:
        key = list(csv.DictReader(fh))
    if not key or not {"id", "source"} <= set(key[0]):
        raise InputError(key_csv, "expected a key with columns id,source")
    ids = [r["id"] for r in key]
    source = {r["id"]: r["source"] for r in key}
    if len(sheets) < 2:
        raise InputError("sheets", "Kendall's W needs at least two observers")
    observers = [_read_sheet(Path(p), ids) for p in sheets]
    result: dict = {"observers": len(observers), "images": len(ids), "criteria": {}}
    for crit in CRITERIA:
        ratings = np.asarray([[obs[i][crit] for i in ids] for obs in observers], float)
        w = kendalls_w(ratings)
        per_image = ratings.mean(axis=0)
        hr = per_image[[source[i] == "HR" for i in ids]]
        gen = per_image[[source[i] != "HR" for i in ids]]
        mw = sps.mannwhitneyu(hr, gen, alternative="two-sided")
        result["criteria"][crit] = {
            "kendalls_w": w,
            "mann_whitney": {
                "u": float(mw.statistic),
                "p": float(mw.pvalue),
                "n_hr": int(hr.size),
                "n_generated": int(gen.size),
                "median_hr": float(np.median(hr)),
                "median_generated": float(np.median(gen)),
                "unit": "mean score of each image over observers",
            },
        }
    return result
