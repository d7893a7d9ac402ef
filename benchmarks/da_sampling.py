"""How much of the fidelity benchmark's DA error is the MIL estimate's own sampling noise?

DA comes from mean intercept lengths sampled along random lines (`bone3d.morphometry.anisotropy`).
bone3d samples 256 directions with about 1024 lines each; BoneJ 2's defaults are 2000 and 10000
(its ``MILVectorSampler``), about 75 times the work. On a 44^3 sub-VOI the cheaper estimate
moves with the seed, so part of every method's DA error against HR is sampling, not image.

For every volume of a split in a ``benchmarks/fidelity.py`` work folder: HR, trilinear LR (scaled
into HR's units by least squares, as the benchmark does) and one method's SR volume, each
segmented as the benchmark segments it (ImageJ IsoData over the scored region, applied in
every sub-VOI with bone in HR), and DA measured per sub-VOI with

* bone3d's sampling (256 directions, 1024 lines) and MIL seeds ``0 .. --seeds - 1`` (seed 0 is
  the benchmark's: with ``--result`` its values are checked against the result file's rows);
* BoneJ 2's default sampling (2000 directions, 10000 lines), seeds 0 and 1.

Prints, per sampling: the noise floor (the mean absolute relative difference between HR's DA
under two seeds, the error a perfect method would show if HR and it were sampled apart), and
per seed the DA mean absolute relative error of LR and of the method against HR measured with
that same seed (the benchmark's protocol), with their ratio: the DA target's number (at most 0.5
on ``hrpqct``). A check on the measurement, like the threshold and Purify rescorings; nothing is
trained.

    .venv/bin/python benchmarks/da_sampling.py --work WORK --method unet_sr-3d+morpho \\
        [--degradation hrpqct --split test --seeds 4 --result RESULT.json --out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402  (the benchmark's own scored region and LR scaling)

SAMPLINGS = {"bone3d": (256, 1024), "BoneJ 2": (2000, 10000)}


def sub_voi_da(vol: np.ndarray, blocks: dict, spacing, n_directions: int, n_lines: int,
               seed: int) -> dict[str, float | None]:  # fmt: skip
    """DA per sub-VOI of ``vol`` segmented as the benchmark does (`voi_morphometry`'s path:
    IsoData over the whole scored region, the sub-VOI's bone cropped to its bounding box)."""
    from bone3d.evaluation.report import segmentation_threshold
    from bone3d.morphometry import segment
    from bone3d.morphometry.anisotropy import fabric_tensor
    from bone3d.morphometry.metrics import _bbox

    t = segmentation_threshold(vol, "isodata", "volume")
    out = {}
    for name, voi in blocks.items():
        bone, _ = segment(vol, t, mask=voi)
        box = _bbox(voi)
        b, v = (bone & voi)[box], voi[box]
        fab = None
        if b.any() and (v & ~b).any():
            fab = fabric_tensor(b, spacing, v, n_directions=n_directions, n_lines=n_lines,
                                seed=seed)  # fmt: skip
        out[name] = None if fab is None else fab["da"]
    return out


def mare(x: list, y: list) -> float:
    """Mean absolute relative error of ``x`` against ``y``, a missing ``x`` a 100 % error
    (`bone3d.evaluation.stats.error_pairs`, the benchmark's rule)."""
    from bone3d.evaluation.stats import error_pairs

    xe, ye, _ = error_pairs(np.array(x, float), np.array(y, float))
    return float(np.mean(np.abs(xe - ye) / np.abs(ye)))


def measure(work: Path, degradation: str, method: str, split: str, seeds: int) -> dict:
    from bone3d.data.datalist import datalist_items
    from bone3d.errors import InputError
    from bone3d.evaluation.report import bone_blocks
    from bone3d.io import read_volume

    datalist = work / degradation / "data" / "datalist.json"
    folder = fidelity.sr_folder(work, degradation, True) / method
    if not datalist.is_file() or not folder.is_dir():
        raise InputError(work, f"no fidelity work folder with {degradation} SR volumes of {method}")
    runs = [("bone3d", s) for s in range(seeds)] + [("BoneJ 2", 0), ("BoneJ 2", 1)]
    da: dict = {f"{name} seed {s}": {} for name, s in runs}
    for item in datalist_items(datalist, split):
        lr, hr = read_volume(item["image"]), read_volume(item["target"])
        h = hr.data[0].numpy().astype(np.float64)
        tri = fidelity._on_hr(lr, hr, "linear")
        a, b = np.polyfit(tri.ravel().astype(np.float64), h.ravel(), 1)
        sr = read_volume(folder / f"{item['specimen']}.nii.gz").data[0].numpy()
        cut = tuple(slice(0, n) for n in fidelity.scored_shape(h.shape))
        vols = {"LR trilinear": (a * tri + b)[cut], method: sr[cut], "HR": h[cut]}
        vols = {k: v.astype(np.float32) for k, v in vols.items()}
        blocks, _ = bone_blocks(vols["HR"], np.ones(vols["HR"].shape, bool), 2)
        for name, s in runs:
            t0 = time.perf_counter()
            key = f"{name} seed {s}"
            for m, v in vols.items():
                for voi, value in sub_voi_da(v, blocks, (fidelity.HR_MM,) * 3,
                                             *SAMPLINGS[name], s).items():  # fmt: skip
                    da[key].setdefault(m, {})[f"{item['specimen']}/{voi}"] = value
            print(f"{item['specimen']}: {key} in {time.perf_counter() - t0:.1f} s", flush=True)
    return da


def summarise(da: dict, method: str) -> dict:
    """Noise floor and per-seed errors (see the module docstring) from `measure`'s values."""
    out = {}
    for name in SAMPLINGS:
        keys = [k for k in da if k.startswith(name + " seed")]
        vois = list(da[keys[0]]["HR"])
        hr = {k: [da[k]["HR"][v] for v in vois] for k in keys}
        floor = [mare(hr[k], hr[keys[0]]) for k in keys[1:]]
        per_seed = {}
        for k in keys:
            lr = mare([da[k]["LR trilinear"][v] for v in vois], hr[k])
            sr = mare([da[k][method][v] for v in vois], hr[k])
            per_seed[k] = {"lr_mare": lr, "method_mare": sr, "ratio": sr / lr}
        out[name] = {"n_voi": len(vois), "noise_floor_mare": float(np.mean(floor)),
                     "per_seed": per_seed}  # fmt: skip
    return out


def check_against(result: dict, da: dict, degradation: str, method: str, split: str) -> float:
    """Largest difference between the bone3d seed-0 DA here and the result file's rows."""
    rows = [r for r in result["rows"] if r["degradation"] == degradation and r["split"] == split]
    worst = 0.0
    for r in rows:
        m = r["method"]
        if m not in ("HR", "LR trilinear", method):
            continue
        mine = da["bone3d seed 0"][m].get(f"{r['specimen']}/{r['voi']}")
        if (mine is None) != (r["da"] is None):
            return float("inf")
        if mine is not None:
            worst = max(worst, abs(mine - r["da"]))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", required=True, help="a benchmarks/fidelity.py work folder")
    ap.add_argument("--method", required=True, help="an SR folder name, e.g. unet_sr-3d+morpho")
    ap.add_argument("--degradation", default="hrpqct")
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--seeds", type=int, default=4, help="MIL seeds with bone3d's sampling")
    ap.add_argument("--result", help="the result file of that work folder: check seed 0 against it")
    ap.add_argument("--out", help="write the DA values and the summary as JSON")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: at least 2 (the noise floor compares seeds)")
    from bone3d.errors import InputError
    from bone3d.io import write_json

    try:
        da = measure(Path(args.work), args.degradation, args.method, args.split, args.seeds)
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    summary = summarise(da, args.method)
    if args.result:
        diff = check_against(json.loads(Path(args.result).read_text()), da, args.degradation,
                             args.method, args.split)  # fmt: skip
        print(f"bone3d seed 0 against {args.result}: largest DA difference {diff:.2e}")
        summary["check_against_result"] = diff
    for name, s in summary.items():
        if not isinstance(s, dict):
            continue
        n_dir, n_lines = SAMPLINGS[name]
        print(f"\n{name} sampling ({n_dir} directions, {n_lines} lines), {s['n_voi']} sub-VOIs: "
              f"noise floor (HR against HR, another seed) {100 * s['noise_floor_mare']:.2f} %")  # fmt: skip
        for k, r in s["per_seed"].items():
            print(f"  {k:18s} DA error: LR {100 * r['lr_mare']:5.2f} %, {args.method} "
                  f"{100 * r['method_mare']:5.2f} %, ratio {r['ratio']:.2f}")  # fmt: skip
    if args.out:
        write_json({"config": vars(args), "samplings": SAMPLINGS, "summary": summary, "da": da},
                   args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
