"""Reference models for no-reference and distribution metrics, fitted on HR training volumes only.

`fit_references` writes into one folder ``niqe_uct.json`` (`bone3d.evaluation.niqe.fit_niqe`) and
``fd_bone.pt`` (`bone3d.evaluation.fd_bone.train_feature_net`), both from the HR volumes of the
datalist's **training** split, with the datalist's HR window; `bone3d evaluate --references DIR`
then reports ``niqe_uct`` per method and ``fd_bone`` of each method against HR.
"""

from __future__ import annotations

import os
from pathlib import Path

from bone3d.io import read_volume, write_json


def fit_references(
    datalist: str | os.PathLike, out_dir: str | os.PathLike, *, steps: int = 300
) -> dict:
    from bone3d.data.datalist import datalist_items, datalist_meta
    from bone3d.evaluation.fd_bone import train_feature_net
    from bone3d.evaluation.niqe import fit_niqe

    window = datalist_meta(datalist)["hr_range"]
    vols = [
        read_volume(it["target"]).data[0].numpy() for it in datalist_items(datalist, "training")
    ]
    out = Path(out_dir)
    niqe = fit_niqe(vols, window)
    niqe["source"] = {
        "datalist": str(Path(datalist).resolve()),
        "split": "training",
        "volumes": len(vols),
    }
    write_json(niqe, out / "niqe_uct.json")
    fd = train_feature_net(vols, window, out / "fd_bone.pt", steps=steps)
    return {"niqe_uct": str(out / "niqe_uct.json"), "fd_bone": fd["path"], "volumes": len(vols)}
