"""Where does Conn.D go? Each scored sub-VOI's connectivity split into loops, particles and
cavities, for HR, trilinear LR and the trained models of ``benchmarks/fidelity.py`` runs.

BoneJ's connectivity is ``1 - delta_chi`` (Odgaard & Gundersen 1993), the edge-corrected Euler
characteristic of the bone, and ``chi = beta_0 - beta_1 + beta_2`` (particles - loops +
enclosed cavities). So, exactly,

    connectivity = loops - (particles - 1) - cavities,   loops = particles + cavities - delta_chi

with particles the 26-connected bone components and cavities the enclosed 6-connected marrow
components (`bone3d.morphometry.connectivity`), and ``loops`` the first Betti number beta_1
that the edge-corrected chi implies: the independent trabecular circuits, what Conn.D is meant
to count. A method can miss HR's Conn.D by lost loops (broken trabeculae) or by extra particles
(fragments, specks): the two call for different remedies, and the mean relative error does not
tell them apart. Printed per method: the mean of each term over the sub-VOIs and its mean and
median difference from HR's in the same sub-VOI.

``--noise-free`` adds two references made from each HR volume by the benchmark's own scanner
model (`bone3d.data.simulate.degrade`, the degradation's preset with its noise off): "HR
blurred" (the PSF alone, on the HR grid) and "LR noise-free" (PSF and LR sampling, trilinear
back onto the HR grid, as LR's row). They ask where the loops go: what the blur removes, what
the sampling adds, and (against "LR trilinear") what the noise costs. They are what a scan
shows when segmented as the benchmark does, not a bound on what it holds: a loop the
noise-free LR has lost is a trabecula blurred below the threshold, which a model can restore
only by undoing the blur, as far as the noise lets it.

The volumes are read from the run's work folder (``WORK/<degradation>/data/<specimen>/`` and
``WORK/<degradation>/sr-ensemble/<method>/<specimen>.nii.gz``, as `fidelity.py` writes them;
``--single-pass``: ``sr/``, its ``--no-self-ensemble`` volumes),
the split from its result file; segmentation and sub-VOIs are the benchmark's
(`fidelity.score_volume`, ``--threshold volume``: ImageJ IsoData once over each volume's scored
region). Seconds, no training:

    .venv/bin/python benchmarks/conn_d_components.py RESULT.json WORK [RESULT.json WORK ...] \\
        --degradation hrpqct
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TERMS = ("loops", "particles", "cavities", "connectivity")


def components(bone: np.ndarray) -> dict[str, float]:
    """Connectivity of a binary sub-VOI and its terms: ``connectivity`` = 1 - delta_chi (BoneJ),
    ``particles``, ``cavities`` and ``loops`` = particles + cavities - delta_chi, so that
    connectivity = loops - (particles - 1) - cavities."""
    from bone3d.morphometry.connectivity import connectivity

    c = connectivity(bone)
    return {
        "loops": c["particles"] + c["cavities"] - c["delta_chi"],
        "particles": float(c["particles"]),
        "cavities": float(c["cavities"]),
        "connectivity": c["connectivity"],
    }


def volume_components(vols: dict[str, np.ndarray], hr: np.ndarray) -> list[dict]:
    """`components` of every sub-VOI with bone in HR, for HR and each of ``vols`` (on HR's grid),
    segmented as `fidelity.score_volume` does; one row per method and sub-VOI."""
    from fidelity import scored_shape

    from bone3d.evaluation.report import bone_blocks, segmentation_threshold
    from bone3d.morphometry import segment

    shape = scored_shape(hr.shape)
    cut = tuple(slice(0, n) for n in shape)
    blocks, _ = bone_blocks(hr[cut], np.ones(shape, bool), 2)
    rows = []
    for name, v in {"HR": hr, **vols}.items():
        v = v[cut]
        t = segmentation_threshold(v, "isodata", "volume")
        for bname, voi in blocks.items():
            bone, _ = segment(v, t, mask=voi)
            idx = np.argwhere(voi)
            box = tuple(slice(a, b) for a, b in zip(idx.min(0), idx.max(0) + 1, strict=True))
            rows.append({"method": name, "voi": bname, **components(bone[box] & voi[box])})
    return rows


def noise_free(hr_img, degradation: str) -> dict[str, np.ndarray]:
    """The ``--noise-free`` references of one HR volume (module docstring), on its grid."""
    from fidelity import _on_hr

    from bone3d.data.simulate import degrade, get_preset

    preset = get_preset(degradation, noise="none")
    blurred = degrade(hr_img, preset, output_spacing_mm=tuple(hr_img.spacing)).image
    lr = degrade(hr_img, preset).image
    return {
        "HR blurred": blurred.data[0].numpy()[tuple(slice(0, n) for n in hr_img.shape[1:])],
        "LR noise-free": _on_hr(lr, hr_img, "linear"),
    }


def run_volumes(
    result: Path,
    work: Path,
    degradation: str,
    split: str,
    ensemble: bool = True,
    references: bool = False,
):
    """Yield ``(specimen, HR image, {method: volume on the HR grid})`` for one benchmark run's
    ``split`` specimens: trilinear LR and every model whose SR volumes the work folder holds
    (the self-ensembled ones, or with ``ensemble`` False the single passes of ``fidelity.py
    --no-self-ensemble``); with ``references`` the noise-free references first
    (`noise_free`)."""
    from fidelity import _on_hr, sr_folder

    from bone3d.io import read_volume

    specimens = json.loads(result.read_text())["data"]["split"][split]
    base, sr = work / degradation, sr_folder(work, degradation, ensemble)
    models = sorted(p.name for p in sr.iterdir() if p.is_dir())
    for spec in specimens:
        hr_img = read_volume(base / "data" / spec / "hr.nii.gz")
        vols = noise_free(hr_img, degradation) if references else {}
        lr = read_volume(base / "data" / spec / "lr.nii.gz")
        vols["LR trilinear"] = _on_hr(lr, hr_img, "linear")
        for m in models:
            path = sr / m / f"{spec}.nii.gz"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no SR volume of {spec} for {m}")
            vols[m] = read_volume(path).data[0].numpy()
        yield spec, hr_img, vols


def work_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of the scripts that read fidelity runs: RESULT WORK pairs,
    ``--degradation``, ``--split``, ``--json``."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", type=Path, metavar="RESULT WORK")
    ap.add_argument("--degradation", default="hrpqct")
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--json", type=Path, help="also write the summary here")
    return ap


def read_runs(ap, args, rows_of, folder: str = "sr-ensemble") -> list[dict]:
    """``rows_of(result, work)`` over the command line's RESULT WORK pairs, each row marked
    with its run; a missing pair member, a folder that is not a fidelity work folder (no
    ``<degradation>/<folder>``) or an unreadable run ends with exit 2 and one line."""
    if len(args.runs) % 2:
        ap.error("give pairs: a result file and its work folder")
    rows = []
    pairs = list(zip(args.runs[::2], args.runs[1::2], strict=True))
    for i, (result, work) in enumerate(pairs):
        print(f"[{i + 1}/{len(pairs)}] {work}", file=sys.stderr)  # progress: seconds per volume
        if not (work / args.degradation / folder).is_dir():
            ap.error(f"{work}: no {args.degradation}/{folder} folder (a fidelity.py --work)")
        try:
            rows += [{**r, "run": str(result)} for r in rows_of(result, work)]
        except (OSError, ValueError, KeyError) as err:
            ap.error(f"{result}, {work}: {err}")
    return rows


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per method: the mean of each term, and the mean and median of (method - HR) per sub-VOI."""
    hr = {(r["specimen"], r["voi"]): r for r in rows if r["method"] == "HR"}
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        out[m] = {"n_voi": len(mine)}
        for t in TERMS:
            diff = [r[t] - hr[(r["specimen"], r["voi"])][t] for r in mine]
            out[m][t] = float(np.mean([r[t] for r in mine]))
            out[m][f"{t}_minus_hr_mean"] = float(np.mean(diff))
            out[m][f"{t}_minus_hr_median"] = float(np.median(diff))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = work_parser(__doc__)
    ap.add_argument(
        "--single-pass",
        action="store_true",
        help="the models' single passes (WORK/<degradation>/sr/, fidelity.py --no-self-ensemble)",
    )
    ap.add_argument(
        "--noise-free",
        action="store_true",
        help="add HR blurred by the scanner's PSF and its LR without noise (module docstring)",
    )
    args = ap.parse_args(argv)

    def rows_of(result: Path, work: Path) -> list[dict]:
        volumes = run_volumes(
            result, work, args.degradation, args.split, not args.single_pass, args.noise_free
        )
        return [
            {**r, "specimen": spec}
            for spec, hr_img, vols in volumes
            for r in volume_components(vols, hr_img.data[0].numpy())
        ]

    rows = read_runs(ap, args, rows_of, "sr" if args.single_pass else "sr-ensemble")
    out = summary(rows)
    print(f"{args.degradation}, {args.split}: mean per sub-VOI (method - HR: mean / median)")
    print(f"{'method':22s} {'n':>3s}" + "".join(f"{t:>24s}" for t in TERMS))
    for m, s in out.items():
        cells = "".join(
            f"{s[t]:8.2f}"
            + (
                ""
                if m == "HR"
                else f" ({s[f'{t}_minus_hr_mean']:+.2f} / {s[f'{t}_minus_hr_median']:+.1f})"
            ).ljust(16)
            for t in TERMS
        )
        print(f"{m:22s} {s['n_voi']:3d}{cells}")
    if args.json:
        from bone3d.io import write_json

        write_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
