"""MONAI decathlon-style datalists, split by specimen.

``datalist.json``::

    {"name": ..., "preset": "hrpqct", "hr_spacing_mm": [..], "lr_range": [lo, hi],
     "hr_range": [lo, hi], "split_seed": 0, "split_hash": "...",
     "training":   [{"image": "s000/lr.nii.gz", "target": "s000/hr.nii.gz",
                     "specimen": "s000", "mask": ..., "truth": ...}, ...],
     "validation": [...], "test": [...]}

``image`` is the LR input, ``target`` the HR volume on the same field of view, ``mask`` an optional
VOI and ``truth`` an optional binary bone truth (phantoms). A *training* entry for unpaired
models may hold only ``image`` or only ``target`` (`bone3d.data.patches.unpaired_loader`). Paths
are relative to the datalist's folder. The split is made over *specimens*: every volume of one specimen lands in one subset,
never split by slice or patch, so no test specimen is ever seen in training.

``lr_range`` / ``hr_range`` are the intensity windows that networks map to [0, 1]; they are chosen
so that marrow and bone tissue land on the same normalised values in both (the HU calibration of
the degradation model applied to the HR window), which lets a network learn a residual.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bone3d.errors import InputError
from bone3d.io import write_json

SPLITS = ("training", "validation", "test")
PATH_KEYS = ("image", "target", "mask", "truth")


def split_by_specimen(
    specimens: Sequence[str], n_val: int, n_test: int, seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle unique specimen ids (seeded) and cut them into training/validation/test."""
    unique = sorted(set(specimens))
    if n_val < 0 or n_test < 0:
        raise InputError("split", "validation and test counts must be >= 0")
    if len(unique) < n_val + n_test + 1:
        raise InputError(
            "split",
            f"{len(unique)} specimen(s) cannot give {n_val} validation + {n_test} test + >=1 training",
        )
    order = list(np.random.default_rng(seed).permutation(unique))
    return {
        "validation": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "training": sorted(order[n_val + n_test :]),
    }


def split_hash(split: dict[str, list[str]]) -> str:
    """A short hash of the specimen split, logged with every run trained on it."""
    blob = json.dumps({k: sorted(split.get(k, [])) for k in SPLITS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_datalist(path: str | os.PathLike, items: list[dict], split: dict, **meta) -> Path:
    """Write ``items`` (one dict per volume, with ``specimen``) into the splits, atomically."""
    path = Path(path)
    root = path.parent.resolve()
    where = {s: k for k, ids in split.items() for s in ids}
    out: dict = {**meta, "split_hash": split_hash(split)}
    for key in SPLITS:
        out[key] = []
    for item in items:
        entry = {}
        for k, v in item.items():
            if k in PATH_KEYS and v is not None:
                v = os.path.relpath(Path(v).resolve(), root)
            entry[k] = v
        out[where[item["specimen"]]].append(entry)
    return write_json(out, path)


def read_datalist(path: str | os.PathLike) -> dict:
    """Read a datalist, resolving entry paths against its folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "datalist not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON: {err}") from None
    root = path.parent
    for key in SPLITS:
        for entry in data.get(key, []):
            for k in PATH_KEYS:
                if k in entry and entry[k] is not None:
                    entry[k] = str((root / entry[k]).resolve())
    return data


def datalist_items(path: str | os.PathLike, split: str) -> list[dict]:
    """The entries of one split (absolute paths). Raises when the split is empty."""
    data = read_datalist(path)
    items = data.get(split, [])
    if not items:
        raise InputError(path, f"split {split!r} is empty")
    return items


def datalist_meta(path: str | os.PathLike) -> dict:
    """The datalist's top-level settings (everything but the splits)."""
    return {k: v for k, v in read_datalist(path).items() if k not in SPLITS}


def hr_bone_level(path: str | os.PathLike, split: str = "training") -> float:
    """One bone/marrow threshold for a split's HR targets, in network units (0..1 over
    ``hr_range``, as `bone3d.data.patches.intensity_transform` maps them).

    ImageJ IsoData (BoneJ's default) on the 256-bin histogram of every HR voxel of the split
    pooled over the ``hr_range`` window (values outside it counted at its ends): one global
    level, as a scan is segmented, so that a patch of marrow alone holds no bone. The histograms
    are summed volume by volume; no more than one volume is in memory at a time.
    """
    from bone3d.io import read_volume
    from bone3d.morphometry.thresholds import imagej_isodata_level

    lo, hi = (float(v) for v in datalist_meta(path)["hr_range"])
    if not hi > lo:
        raise InputError(path, f"hr_range {lo}..{hi} is empty")
    targets = [it["target"] for it in datalist_items(path, split) if it.get("target")]
    if not targets:
        raise InputError(path, f"split {split!r} has no HR target to take a bone level from")
    hist = np.zeros(256, np.int64)
    for t in targets:
        v = np.clip(read_volume(t).data.numpy().ravel(), lo, hi)
        hist += np.histogram(v, bins=256, range=(lo, hi))[0]
    return (imagej_isodata_level(hist) + 1) / 256.0


def experiment_name(path: str | os.PathLike) -> str:
    """MLflow experiment for runs on this dataset: runs of one dataset line up in one experiment."""
    meta = datalist_meta(path)
    return f"bone3d-{meta.get('name', Path(path).parent.name)}-{meta.get('split_hash', 'nosplit')}"
