"""``bone3d <verb>``: the pipeline steps outside training.

Every verb has ``--help``; bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bone3d.errors import InputError
from bone3d.io import write_csv, write_json


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


# ----------------------------------------------------------------------------------------------
# verbs
# ----------------------------------------------------------------------------------------------


def cmd_phantom(args) -> int:
    from bone3d.data.phantom import PhantomSpec, make_phantom
    from bone3d.io import write_volume

    spec = PhantomSpec(
        shape=tuple(args.shape),
        spacing_mm=args.spacing,
        bv_tv=args.bv_tv,
        tb_th_mm=args.tb_th,
        rod_fraction=args.rod_fraction,
        anisotropy=args.anisotropy,
        cortex=args.cortex,
        ct_th_mm=args.ct_th,
        n_pores=args.pores,
        perforation=args.perforation,
        seed=args.seed,
    )
    ph = make_phantom(spec)
    write_volume(ph.image, args.output)
    if args.truth:
        write_volume(ph.truth, args.truth)
    print(
        f"wrote {args.output}: {spec.shape} voxels of {spec.spacing_mm} mm, "
        f"BV/TV {ph.info['bv_tv_trabecular']:.3f}, pores {ph.pores}"
    )
    return 0


def cmd_simulate(args) -> int:
    from bone3d.data.simulate import degrade
    from bone3d.io import read_volume, write_volume

    hr = read_volume(args.input, spacing=args.spacing)
    d = degrade(
        hr,
        args.preset,
        seed=args.seed,
        misalign=args.misalign,
        intensity_map=tuple(args.intensity_map) if args.intensity_map else None,
    )
    out = write_volume(d.image, args.output)
    record = {"input": str(Path(args.input).resolve()), "output": str(out.resolve()), **d.record()}
    sidecar = (
        Path(args.record)
        if args.record
        else out.with_name(out.name.split(".")[0] + ".degradation.json")
    )
    write_json(record, sidecar)
    sp = tuple(round(float(s), 6) for s in d.image.spacing)
    print(f"wrote {out}: shape {tuple(d.image.spatial_shape)}, spacing {sp} mm; record {sidecar}")
    return 0


def cmd_prepare(args) -> int:
    from bone3d.data.prepare import prepare

    path = prepare(
        args.output,
        phantoms=args.phantoms or 0,
        hr_dir=args.hr_dir,
        pairs=args.pairs,
        preset=args.preset,
        n_val=args.val,
        n_test=args.test,
        seed=args.seed,
        phantom_shape=tuple(args.shape),
        hr_spacing=args.hr_spacing,
        misalign=args.misalign,
        register=args.register,
        psf_jitter=args.psf_jitter,
        cortical=args.cortical,
    )
    data = json.loads(path.read_text())
    counts = ", ".join(f"{k} {len(data[k])}" for k in ("training", "validation", "test"))
    print(f"wrote {path} ({counts} specimens; split {data['split_hash']})")
    return 0


def cmd_register(args) -> int:
    from bone3d.registration.pairing import MIN_COVERAGE, MIN_NCC

    options = {
        "type": args.type,
        "seed": args.seed,
        "init": args.init,
        "min_ncc": MIN_NCC if args.min_ncc is None else args.min_ncc,
        "min_coverage": MIN_COVERAGE if args.min_coverage is None else args.min_coverage,
    }
    if args.pairs:
        if args.lr or args.hr or args.mask:
            raise InputError("--pairs", "give either --pairs or --lr/--hr, not both")
        from bone3d.data.prepare import prepare

        path = prepare(
            args.output,
            pairs=args.pairs,
            n_val=args.val,
            n_test=args.test,
            seed=args.seed,
            register=True,
            register_options=options,
        )
        data = json.loads(path.read_text())
        flagged = data.get("registration", {}).get("flagged", {})
        n = sum(len(data[k]) for k in ("training", "validation", "test"))
        print(f"wrote {path}: {n} registered pairs, {len(flagged)} flagged and left out")
        for sid, reasons in flagged.items():
            print(f"  flagged {sid}: {'; '.join(reasons)}", file=sys.stderr)
        return 0
    if not (args.lr and args.hr):
        raise InputError("register", "give --lr and --hr (or --pairs CSV)")
    from bone3d.io import read_volume
    from bone3d.registration.pairing import register_pair

    hr = read_volume(args.hr)
    lr = read_volume(args.lr)
    mask = read_volume(args.mask, label=True) if args.mask else None
    rec = register_pair(hr, lr, args.output, mask=mask, name=Path(args.hr).name, **options)
    a, b = rec["similarity_before"]["ncc"], rec["similarity_after"]["ncc"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"registered {args.lr} to {args.hr} ({rec['registration']['type']}, "
        f"init {rec['registration']['init']}, {rec['registration']['elapsed_s']:.1f} s): "
        f"NCC {fmt(a)} -> {fmt(b)}, HR field covered {rec['hr_covered_fraction']:.1%}; "
        f"wrote {args.output}"
    )
    if not rec["accepted"]:
        print(f"bone3d register: pair flagged: {'; '.join(rec['reasons'])}", file=sys.stderr)
        return 3
    return 0


def _number_or_name(text: str) -> str | float:
    """A threshold given on the command line: a number (a fixed grey value) or a method name."""
    try:
        return float(text)
    except ValueError:
        return text


def cmd_evaluate(args) -> int:
    from bone3d.evaluation.report import evaluate
    from bone3d.io import read_volume

    pred = read_volume(args.pred)
    hr = read_volume(args.hr)
    lr = read_volume(args.lr) if args.lr else None
    mask = read_volume(args.mask, label=True) if args.mask else None
    canc = read_volume(args.cancellous, label=True) if args.cancellous else None
    data_range = args.data_range
    if data_range is None and args.datalist:
        from bone3d.data.datalist import datalist_meta

        lo, hi = datalist_meta(args.datalist)["hr_range"]
        data_range = float(hi - lo)
    res = evaluate(
        pred,
        hr,
        args.output,
        lr=lr,
        mask=mask,
        cancellous=canc,
        data_range=data_range,
        threshold=_number_or_name(args.threshold),
        threshold_scope=args.threshold_scope,
        split=args.split,
        name=args.name,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_id=args.run_id,
        references=args.references,
        slice_axes=tuple(dict.fromkeys(["axial", *(args.slice_axes or [])])),
    )
    methods = [m for m in res["methods"] if m != "HR"]
    print(f"data range {res['data_range']:.4g}; {res['n_blocks']} sub-VOIs")
    print(
        f"{'':10s}{'PSNR dB':>9s}{'SSIM':>8s}"
        + "".join(f"{k:>16s}" for k in ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3"))
    )
    for m in [*methods, "HR"]:
        im = res["image_metrics"].get(m, {}).get("voi")
        head = f"{im['psnr_db']:9.2f}{im['ssim']:8.4f}" if im else f"{'':9s}{'':8s}"
        v = res["voi"][m]
        print(
            f"{m:10s}{head}"
            + "".join(f"{v[k]:16.4f}" for k in ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3"))
        )
    print(f"wrote {res['files']['html']} and metrics.json, voi_metrics.csv, PNGs in {args.output}")
    if res.get("mlflow_run_id"):
        print(f"logged to MLflow run {res['mlflow_run_id']} ({args.tracking_uri})")
    return 0


def cmd_fit_references(args) -> int:
    from bone3d.evaluation.references import fit_references

    res = fit_references(args.datalist, args.output, steps=args.steps)
    print(f"fitted on {res['volumes']} HR training volumes: {res['niqe_uct']}, {res['fd_bone']}")
    return 0


def cmd_fit_regressor(args) -> int:
    import numpy as np

    from bone3d.data.datalist import datalist_items, datalist_meta, hr_bone_level
    from bone3d.io import read_volume
    from bone3d.losses.regressor import fit_regressor, save_regressor

    lo, hi = datalist_meta(args.datalist)["hr_range"]
    if args.level == "otsu":
        level = None
    elif args.level == "isodata":
        level = hr_bone_level(args.datalist)
    else:  # checked before any volume is read
        try:
            level = float(args.level)
        except ValueError:
            raise InputError("--level", f"otsu, isodata or a number, not {args.level!r}") from None
    vols, spacing = [], None
    for item in datalist_items(args.datalist, "training"):
        hr = read_volume(item["target"])
        vols.append((hr.data[0].numpy().astype(np.float32) - lo) / (hi - lo))  # the bundles' window
        spacing = tuple(float(s) for s in hr.spacing)
    model, report = fit_regressor(
        vols, spacing, spatial_dims=args.spatial_dims, patch=args.patch,
        n_patches=args.patches, steps=args.steps, seed=args.seed, level=level,
    )  # fmt: skip
    report |= {"datalist": str(Path(args.datalist).resolve()), "hr_window": [lo, hi]}
    save_regressor(model, args.output, report)
    r = ", ".join(f"{k} {v:.3f}" for k, v in report["held_out_pearson_r"].items())
    print(f"wrote {args.output}; held-out Pearson R: {r}")
    return 0


def cmd_compare(args) -> int:
    from bone3d.evaluation.compare import compare, format_table, write_outputs

    result = compare(args.tracking_uri, args.experiment)
    print(format_table(result))
    if args.output:
        paths = write_outputs(result, args.output)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_reader_study(args) -> int:
    from bone3d.evaluation.reader_study import analyse_study, export_study

    if args.action == "export":
        from bone3d.io import read_volume

        if not args.hr or len(args.hr) != len(args.generated or []):
            raise InputError("--hr", "give one --generated volume for every --hr volume")
        pairs, names = [], []
        for h, g in zip(args.hr, args.generated, strict=True):
            hv, gv = read_volume(h), read_volume(g)
            pairs.append((hv.data[0].numpy(), gv.data[0].numpy()))
            names.append(Path(h).name.split(".")[0])
        info = export_study(pairs, args.output, n_slices=args.slices, seed=args.seed, names=names)
        print(
            f"wrote {info['images']} blinded images, score_sheet.csv and key.csv (keep it) "
            f"to {args.output}; window {info['window'][0]:.4g}..{info['window'][1]:.4g}"
        )
        return 0
    if not args.key or not args.sheets:
        raise InputError("analyse", "give --key key.csv and the returned score sheets")
    res = analyse_study(args.key, args.sheets)
    print(f"{res['observers']} observers, {res['images']} images")
    print(
        f"{'criterion':12s}{'W':>8s}{'p(W)':>10s}{'med HR':>9s}{'med gen':>9s}{'U':>8s}{'p(MWU)':>10s}"
    )
    for crit, r in res["criteria"].items():
        w, mw = r["kendalls_w"], r["mann_whitney"]
        print(
            f"{crit:12s}{w['w']:8.3f}{w['p']:10.3g}{mw['median_hr']:9.2f}"
            f"{mw['median_generated']:9.2f}{mw['u']:8.1f}{mw['p']:10.3g}"
        )
    if args.output:
        print(f"wrote {write_json(res, args.output)}")
    return 0


def _infer_exported(bundle: Path, args) -> int:
    """A bundle made by `bone3d export` (one merged inference.json of MONAI parts): MONAI's
    SaveImaged writes into a temporary folder beside the output, then the file is renamed. The
    bundle's ``scripts`` package is imported for this call only (`exported_scripts`), so one
    process can run several exported bundles."""
    import tempfile

    from monai.bundle import run as bundle_run

    from bone3d.export import exported_scripts

    if args.checkpoint:
        raise InputError("--checkpoint", "an exported bundle uses its own models/model.pt")
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise InputError(out, "the output path is the input; inputs are never overwritten")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=out.parent, prefix=".bone3d-infer-") as tmp,
        exported_scripts(bundle),
    ):
        bundle_run(
            config_file=str(bundle / "configs" / "inference.json"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"),
            bundle_root=str(bundle),
            input_image=str(Path(args.input).resolve()),
            output_dir=tmp,
            **({} if args.self_ensemble is None else {"self_ensemble": args.self_ensemble}),
        )
        (made,) = Path(tmp).iterdir()
        if not "".join(made.suffixes).endswith("".join(out.suffixes) or ".nii.gz"):
            raise InputError(out, f"the bundle writes {''.join(made.suffixes)} files")
        os.replace(made, out)
    return 0


def cmd_infer(args) -> int:
    from monai.bundle import run as bundle_run

    from bone3d.engines import bundle_files
    from bone3d.io import read_volume

    bundle = Path(args.bundle)
    if not (bundle / "configs" / "inference.json").is_file():
        raise InputError(bundle / "configs" / "inference.json", "missing bundle config")
    if not (bundle.parent / "common").is_dir() and not (bundle / "configs" / "3d.json").is_file():
        read_volume(args.input)
        return _infer_exported(bundle, args)
    if not (bundle / "configs" / f"{args.variant}.json").is_file():
        raise InputError(bundle / "configs" / f"{args.variant}.json", "missing bundle config")
    files = bundle_files(bundle, "inference", args.variant)
    read_volume(args.input)  # fail fast, with a clear message, before building the network
    overrides = {
        "bundle_root": str(bundle),
        "input_image": str(args.input),
        "output_image": str(args.output),
    }
    if args.self_ensemble is not None:
        overrides["self_ensemble"] = args.self_ensemble
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise InputError(args.checkpoint, "checkpoint not found")
        overrides["checkpoint"] = str(args.checkpoint)
    elif not (bundle / "models" / "model.pt").is_file():
        raise InputError(
            bundle / "models" / "model.pt", "no trained weights: train the bundle first"
        )
    bundle_run(**files, **overrides)
    return 0


UNITS = {
    "bv_tv": "", "bv_mm3": "mm^3", "tv_mm3": "mm^3", "tb_th_mm": "mm", "tb_th_sd_mm": "mm",
    "tb_th_max_mm": "mm", "tb_sp_mm": "mm", "tb_sp_sd_mm": "mm", "tb_sp_max_mm": "mm",
    "tb_n_per_mm": "mm^-1", "euler": "", "delta_chi": "", "connectivity": "",
    "conn_d_per_mm3": "mm^-3", "particles": "", "cavities": "", "da": "", "da_ratio": "",
    "smi": "", "ct_th_mm": "mm", "ct_po": "", "ct_po_closed": "", "ct_po_open": "",
    "pore_count": "", "ba_ta": "",
}  # fmt: skip


def _segment_image(img, args, mask):
    """Binary bone of ``img``: as given when the image is already binary, else thresholded."""
    import numpy as np

    from bone3d.morphometry.thresholds import (
        METHODS,
        density_threshold,
        prefilter,
        purify,
        segment,
    )

    arr = img.data[0].numpy()
    values = np.unique(arr[: min(arr.shape[0], 64)])
    if args.threshold == "isodata" and values.size <= 2 and np.unique(arr).size <= 2:
        bone, info = arr > arr.min(), {"method": "binary input (non-zero is bone)", "value": None}
    else:
        grey = prefilter(arr, gaussian_sigma=args.gauss, tv_weight=args.tv)
        method: str | float
        if args.threshold.startswith("density:"):
            if not args.calibration:
                raise InputError("threshold", "density:MGHA needs --calibration SLOPE INTERCEPT")
            method = density_threshold(float(args.threshold.split(":", 1)[1]), *args.calibration)
        else:
            method = _number_or_name(args.threshold)
            if isinstance(method, str) and method not in METHODS:
                raise InputError(
                    "threshold",
                    f"unknown method {method!r}; use {METHODS}, a number or density:MGHA",
                )
        bone, t = segment(grey, method, mask=mask)
        info = {
            "method": args.threshold,
            "value": t,
            "gaussian_sigma_vox": args.gauss,
            "tv_weight": args.tv,
        }
    if args.purify:
        bone = purify(bone)
        info["purified"] = True
    return bone, info


def cmd_morpho(args) -> int:
    from tqdm import tqdm

    from bone3d.io import read_volume
    from bone3d.morphometry import FIELDS, morphometry
    from bone3d.morphometry.vois import cylinder, from_mask

    metrics = tuple(args.metrics) if args.metrics else None
    rows = []
    bar = tqdm(
        args.inputs,
        desc="morphometry",
        unit="volume",
        disable=True
        if (len(args.inputs) < 2 and not args.progress)
        else None,  # None: off when not a terminal
    )
    for path in bar:
        img = read_volume(path, spacing=args.spacing)
        shape = img.spatial_shape
        voi, voi_desc = None, "whole image"
        if args.mask:
            voi = from_mask(
                read_volume(args.mask, label=True, spacing=args.spacing).data[0].numpy(), shape
            )
            voi_desc = f"mask {args.mask}"
        elif args.cylinder:
            d, h = args.cylinder
            voi = cylinder(shape, img.spacing, d, h, centre_mm=args.centre, axis=args.axis)
            voi_desc = f"cylinder {d} x {h} mm, axis {args.axis}, centre {args.centre or 'image centre'} (voxel-centre rule)"
        bone, thr = _segment_image(img, args, voi)
        cortex = None
        if args.cortex:
            cortex = read_volume(args.cortex, label=True, spacing=args.spacing).data[0].numpy() > 0
        chosen = metrics or (
            ("bv_tv", "tb_th", "tb_sp", "tb_n", "connectivity", "da", "smi", "ba_ta")
            + (("cortical",) if (args.cortex or args.cortical) else ())
        )
        res = morphometry(
            bone, img.spacing, voi=voi, metrics=chosen, tb_n_method=args.tb_n, cortex=cortex,
            progress=lambda step, p=path: bar.set_postfix_str(f"{p}: {step}") if not bar.disable else None,
        )  # fmt: skip
        rows.append({"file": str(path), **res, "threshold": thr, "voi": voi_desc})
    _print_table(rows, FIELDS)
    if args.json:
        write_json(rows[0] if len(rows) == 1 else rows, args.json)
    if args.csv:
        table = [
            [
                r["file"],
                *[json.dumps(r[k]) if isinstance(r[k], list) else r[k] for k in FIELDS],
                json.dumps(r["spacing_mm"]),
                r["threshold"]["method"],
                r["threshold"]["value"],
                r["voi"],
            ]
            for r in rows
        ]
        header = ["file", *FIELDS, "spacing_mm", "threshold_method", "threshold", "voi"]
        write_csv(table, args.csv, header)
    return 0


def _print_table(rows, fields) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bone3d morphometry")
    table.add_column("metric")
    table.add_column("unit")
    for r in rows:
        table.add_column(Path(r["file"]).name, justify="right")
    for key in fields:
        if all(r.get(key) is None for r in rows):
            continue
        cells = []
        for r in rows:
            v = r.get(key)
            cells.append(
                "-"
                if v is None
                else (
                    f"{v:.4g}"
                    if isinstance(v, float)
                    else str(v)
                    if not isinstance(v, list)
                    else ", ".join(f"{x:.3g}" for x in v)
                )
            )
        table.add_row(key, UNITS.get(key, ""), *cells)
    Console().print(table)
    for r in rows:
        for note in r.get("notes", []):
            print(f"note ({Path(r['file']).name}): {note}")


def cmd_export(args) -> int:
    from bone3d.export import export_bundle

    out = export_bundle(
        args.bundle,
        args.output,
        variant=args.variant,
        checkpoint=args.checkpoint,
        self_ensemble=args.self_ensemble,
    )
    print(
        f"wrote {out}: runs with MONAI alone (python -m monai.bundle run, see its docs/README.md)"
    )
    return 0


def cmd_tracking_server(args) -> int:
    from bone3d import tracking

    if args.action == "start":
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: binding to {args.host} exposes an unauthenticated MLflow server")
        print("starting PostgreSQL and the MLflow server (a minute on first use) ...", flush=True)
        st = tracking.start(args.root, host=args.host, port=args.port, pg_port=args.pg_port)
        print(f"MLflow server at {st['uri']} (PID {st['mlflow_pid']}), backend {st['backend']}")
        print(f"artifacts in {st['artifacts']}, log {st['log']}")
        print(f"bundle runs: --tracking mlflow --tracking_uri {st['uri']}")
        print(f"stop with: bone3d tracking-server stop --root {args.root}")
    elif args.action == "status":
        print(json.dumps(tracking.status(args.root), indent=2))
    else:
        st = tracking.stop(args.root)
        print(
            f"MLflow (PID {st['mlflow_pid']}) {'stopped' if st['mlflow_stopped'] else 'STILL RUNNING'}; "
            f"PostgreSQL (PID {st['pg_pid']}) {'stopped' if st['pg_stopped'] else 'STILL RUNNING'}"
        )
        return 0 if st["mlflow_stopped"] and st["pg_stopped"] else 1
    return 0


def cmd_models(args) -> int:
    import torch

    from bone3d.nets import REGISTRY, TAKES_SCALE, build, n_parameters

    rows = []
    for name, entry in REGISTRY.items():
        for preset in entry.presets:
            counts = {}
            for d in (2, 3):
                kw = {"scale": 2} if name in TAKES_SCALE else {}
                with torch.device("meta"):  # count without allocating (paper 3D nets are huge)
                    counts[f"params_{d}d"] = n_parameters(build(name, d, preset, **kw))
            rows.append(
                {
                    "name": name,
                    "kind": entry.kind,
                    "preset": preset,
                    "source": entry.source,
                    **counts,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bone3d network registry (1 channel in/out; x2 for SR models)")
    for col in ("name", "kind", "preset", "params 2D", "params 3D", "source"):
        table.add_column(col, justify="right" if col.startswith("params") else "left")
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            r["preset"],
            f"{r['params_2d']:,}",
            f"{r['params_3d']:,}",
            r["source"],
        )
    Console(width=160).print(table)
    return 0


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from bone3d.data.simulate import PRESETS

    parser = argparse.ArgumentParser(
        prog="bone3d",
        description="Low-resolution bone CT to micro-CT-like volumes, judged by morphometry.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("phantom", help="generate a synthetic trabecular bone volume (mg HA/cm^3)")
    p.add_argument("-o", "--output", required=True, help="output volume (.nii.gz/.mha)")
    p.add_argument("--truth", help="also write the binary bone truth here")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, default=0.05, help="voxel size in mm (default 0.05)")
    p.add_argument("--bv-tv", type=float, default=0.15, help="bone volume fraction (0.02-0.5)")
    p.add_argument("--tb-th", type=float, default=0.15, help="trabecular thickness in mm")
    p.add_argument("--rod-fraction", type=float, default=0.5, help="0 = plates, 1 = rods")
    p.add_argument("--anisotropy", type=float, default=1.3, help=">= 1, elongation along z")
    p.add_argument("--cortex", action="store_true", help="add a cortical shell")
    p.add_argument("--ct-th", type=float, default=0.4, help="cortical thickness in mm")
    p.add_argument("--pores", type=_positive_int, default=0, help="closed cortical pores")
    p.add_argument(
        "--perforation", type=float, default=0.0,
        help="bone loss: the fraction (0-1) of the trabecular bone cut away in smooth patches, "
        "leaving perforated plates and broken rods (osteoporotic bone); BV/TV then ends at "
        "about (1 - perforation) x --bv-tv",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("simulate", help="degrade an HR volume into a realistic LR CT scan")
    p.add_argument("input", help="HR volume")
    p.add_argument("-o", "--output", required=True, help="LR volume to write (HU)")
    p.add_argument("--preset", default="mdct", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--misalign", action="store_true", help="random rigid misalignment (<=10 deg, <=2 mm)"
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="HR spacing in mm, overriding the file's",
    )
    p.add_argument(
        "--intensity-map",
        type=float,
        nargs=2,
        metavar=("MARROW", "BONE"),
        help="input values of marrow and bone, mapped to 0 and 1400 HU",
    )
    p.add_argument("--record", help="where to write the degradation record (JSON)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "register",
        help="register an LR scan to an HR scan (or many pairs) and write training pairs + QA",
        description="Register LR (moving) to HR (fixed) with ANTs. OUTDIR gets transform.mat "
        "(ANTs/ITK affine mapping HR physical points to LR physical points, LPS mm), lr.nii.gz "
        "(LR in the HR frame at LR spacing), lr_hrgrid.nii.gz (LR on the HR grid), hr.nii.gz "
        "(HR cropped to the common field), qa.json and qa.png. Exit code 3: the pair was "
        "flagged by the QA thresholds. With --pairs, every row of the CSV is registered into "
        "OUTDIR/<specimen>/ and OUTDIR/datalist.json lists the accepted pairs.",
    )
    p.add_argument("--lr", help="LR scan (moving)")
    p.add_argument("--hr", help="HR scan (fixed)")
    p.add_argument("--pairs", help="CSV with columns specimen,lr,hr (paths relative to it)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--type", default="rigid", choices=["rigid", "affine"])
    p.add_argument("--init", default="auto", choices=["auto", "com", "search"])
    p.add_argument("--mask", help="binary mask on the HR grid restricting the metric")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-ncc", type=float, help="flag pairs below this correlation (0.5)")
    p.add_argument("--min-coverage", type=float, help="flag pairs below this HR coverage (0.5)")
    p.add_argument("--val", type=_positive_int, default=1, help="--pairs: validation specimens")
    p.add_argument("--test", type=_positive_int, default=1, help="--pairs: test specimens")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "evaluate",
        help="image metrics, morphometry and agreement of an SR volume vs HR (and LR), as a report",
        description="Writes OUTDIR/metrics.json, voi_metrics.csv, slices.png, agreement.png, "
        "slice_metrics.png and report.html (self-contained); with --tracking-uri also an MLflow "
        "run (or --run-id: an existing run) holding the numbers and the files.",
    )
    p.add_argument("--pred", required=True, help="SR volume on the HR grid")
    p.add_argument("--hr", required=True, help="HR volume (the truth)")
    p.add_argument("--lr", help="LR input (any grid overlapping HR; resampled trilinearly)")
    p.add_argument("--mask", help="VOI mask on the HR grid")
    p.add_argument("--cancellous", help="cancellous-region mask on the HR grid")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--data-range", type=float, help="L for PSNR/SSIM (default: HR range in VOI)")
    p.add_argument("--datalist", help="take the data range from this datalist's hr_range")
    p.add_argument(
        "--threshold", default="isodata", help="isodata (ImageJ), otsu or a number (HR units)"
    )
    p.add_argument(
        "--threshold-scope",
        choices=["volume", "voi"],
        default="volume",
        help="volume: one threshold per volume over the VOI, applied in every sub-VOI (as a scan "
        "is segmented); voi: computed inside each sub-VOI",
    )
    p.add_argument("--split", type=int, default=2, help="sub-VOIs per axis for agreement (2)")
    p.add_argument("--name", default="SR", help="method name in tables and MLflow")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlruns.db")
    p.add_argument("--experiment", default="bone3d-evaluate", help="MLflow experiment")
    p.add_argument("--run-id", help="log into this existing MLflow run")
    p.add_argument(
        "--references", help="folder from bone3d fit-references: adds niqe_uct and fd_bone"
    )
    p.add_argument(
        "--slice-axes",
        nargs="+",
        choices=["axial", "coronal", "sagittal"],
        help="slice-wise metrics also along these axes (axial always)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "fit-references",
        help="fit niqe_uct and train the fd_bone feature network on a datalist's HR training volumes",
    )
    p.add_argument("--datalist", required=True)
    p.add_argument("-o", "--output", required=True, help="folder for niqe_uct.json and fd_bone.pt")
    p.add_argument("--steps", type=int, default=300, help="feature-network training steps")
    p.set_defaults(func=cmd_fit_references)

    p = sub.add_parser(
        "fit-regressor",
        help="train the frozen morphometry regressor of bone3d.losses on a datalist's HR volumes",
    )
    p.add_argument("--datalist", required=True)
    p.add_argument("-o", "--output", required=True, help="regressor file (.pt)")
    p.add_argument("--spatial-dims", type=int, choices=[2, 3], default=3)
    p.add_argument("--patch", type=int, default=32, help="patch size in voxels")
    p.add_argument("--patches", type=int, default=384, help="patches measured (half degraded)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--level", default="otsu",
        help="segmentation of the patches' labels: otsu (default) each patch at its own Otsu "
        "threshold; isodata one level for every patch, ImageJ IsoData of the training HR "
        "volumes pooled (bone3d.data.datalist.hr_bone_level); or that grey value in the "
        "networks' 0..1 window",
    )  # fmt: skip
    p.set_defaults(func=cmd_fit_regressor)

    p = sub.add_parser(
        "compare",
        help="methods x metrics table with statistical tests over an MLflow experiment",
        description="Reads every run of EXPERIMENT that holds bone3d evaluate's "
        "evaluation/voi_metrics.csv; prints PSNR, SSIM and, per morphometric parameter, the "
        "mean absolute relative error vs HR (best marked *), with Friedman/Kruskal-Wallis and "
        "Holm-corrected post-hoc tests; -o writes compare.json and compare.csv.",
    )
    p.add_argument("--tracking-uri", default="sqlite:///mlruns.db")
    p.add_argument("--experiment", default="bone3d-evaluate")
    p.add_argument("-o", "--output", help="folder for compare.json and compare.csv")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "reader-study",
        help="export a blinded slice set and score sheet, or analyse returned sheets",
        description="export: axial slices of HR and generated volumes, one window/level, random "
        "anonymous IDs, shuffled, with score_sheet.csv (contrast 1-3; noise, sharpness, shadows, "
        "texture 1-5) and key.csv. analyse: Kendall's W per criterion across observers and "
        "Mann-Whitney U between HR and generated images.",
    )
    p.add_argument("action", choices=["export", "analyse"])
    p.add_argument("--hr", nargs="+", help="export: HR volumes")
    p.add_argument("--generated", nargs="+", help="export: generated volumes, same order")
    p.add_argument("--slices", type=int, default=5, help="export: axial slices per volume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", help="analyse: key.csv from the export")
    p.add_argument("--sheets", nargs="+", help="analyse: returned score sheets, one per observer")
    p.add_argument("-o", "--output", help="export: folder; analyse: result JSON")
    p.set_defaults(func=cmd_reader_study)

    p = sub.add_parser("prepare", help="make LR/HR pairs and a datalist.json split by specimen")
    p.add_argument("-o", "--output", required=True, help="dataset folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--phantoms", type=_positive_int, help="number of phantom specimens")
    src.add_argument("--hr-dir", help="folder of HR volumes, one specimen each")
    src.add_argument("--pairs", help="CSV with columns specimen,lr,hr of aligned pairs")
    p.add_argument(
        "--register",
        action="store_true",
        help="--pairs: register each pair first (as bone3d register --pairs; flagged pairs "
        "are left out)",
    )
    p.add_argument("--preset", default="hrpqct", choices=sorted(PRESETS))
    p.add_argument("--val", type=_positive_int, default=1, help="validation specimens")
    p.add_argument("--test", type=_positive_int, default=1, help="test specimens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 96, 96],
        metavar=("X", "Y", "Z"),
        help="phantom size in voxels",
    )
    p.add_argument(
        "--hr-spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="HR spacing for files without one",
    )
    p.add_argument("--misalign", action="store_true")
    p.add_argument(
        "--psf-jitter",
        type=float,
        default=0.0,
        metavar="J",
        help="simulated pairs: each specimen's PSF FWHM = the preset's x U(1-J, 1+J) per axis "
        "(a varying blur, for blind SR such as DAN)",
    )
    p.add_argument(
        "--cortical",
        type=_positive_int,
        default=0,
        metavar="K",
        help="--phantoms: the last K phantoms inside a porous cortical shell, with bone-free "
        "space around it (about 43 %% of the box), so that training sees empty space",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("infer", help="whole-stack super-resolution with a trained bundle")
    p.add_argument("bundle", help="bundle folder (with configs/ and models/)")
    p.add_argument("input", help="LR volume")
    p.add_argument("-o", "--output", required=True, help="micro-CT-like volume to write")
    p.add_argument("--variant", default="3d", help="variant config (3d, 2d, 2p5d)")
    p.add_argument("--checkpoint", help="weights (default: BUNDLE/models/model.pt)")
    p.add_argument(
        "--self-ensemble",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the predictions over the mirrored inputs (EDSR+ self-ensemble: 4 passes "
        "for 2D/2.5D, 8 for 3D; bone3d.inference.ensemble); --no-self-ensemble: single "
        "passes; default: the bundle's self_ensemble setting (an exported bundle's own)",
    )
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "export",
        help="a trained bundle as a zip that runs (inference.json) and fine-tunes (train.json) "
        "in MONAI without bone3d",
    )
    p.add_argument("bundle", help="bundle folder (with configs/ and models/)")
    p.add_argument("--variant", default="3d", help="variant config (3d, 2d, 2p5d)")
    p.add_argument("-o", "--output", required=True, help="the .zip to write")
    p.add_argument("--checkpoint", help="weights (default: the variant's models/model.pt)")
    p.add_argument(
        "--self-ensemble",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the exported bundle averages over mirrored inputs by default (default: "
        "the bundle's self_ensemble setting; switch with --self_ensemble false|true at run time)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "tracking-server",
        help="start/stop a shared MLflow server on PostgreSQL (bound to 127.0.0.1)",
    )
    p.add_argument("action", choices=["start", "status", "stop"])
    p.add_argument(
        "--root", default="mlflow-server", help="folder for the database cluster, artifacts, logs"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--pg-port", type=int, help="PostgreSQL port at creation (default: a free one)")
    p.set_defaults(func=cmd_tracking_server)

    p = sub.add_parser("models", help="list the network registry with presets and parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("morpho", help="bone morphometry (BoneJ conventions, mm units)")
    p.add_argument("inputs", nargs="+", help="grey-level or binary volumes")
    p.add_argument(
        "--threshold",
        default="isodata",
        help="isodata (ImageJ), otsu, a number, or density:MGHA (binary inputs are used as they are)",
    )
    p.add_argument(
        "--calibration",
        type=float,
        nargs=2,
        metavar=("SLOPE", "INTERCEPT"),
        help="density = SLOPE * value + INTERCEPT (mg HA/cm^3)",
    )
    p.add_argument(
        "--gauss", type=float, default=0.0, help="Gaussian pre-filter sigma in voxels (e.g. 1.2)"
    )
    p.add_argument("--tv", type=float, default=0.0, help="total-variation denoising weight")
    p.add_argument(
        "--purify", action="store_true", help="keep the largest particle, fill enclosed cavities"
    )
    voi = p.add_mutually_exclusive_group()
    voi.add_argument("--mask", help="binary VOI mask on the same grid")
    voi.add_argument(
        "--cylinder", type=float, nargs=2, metavar=("DIAMETER_MM", "HEIGHT_MM"), help="cylinder VOI"
    )
    p.add_argument(
        "--centre",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="cylinder centre in mm (array frame)",
    )
    p.add_argument("--axis", default="z", choices=["x", "y", "z"], help="cylinder axis")
    p.add_argument(
        "--metrics",
        nargs="+",
        choices=[
            "bv_tv",
            "tb_th",
            "tb_sp",
            "tb_n",
            "connectivity",
            "da",
            "smi",
            "ba_ta",
            "cortical",
        ],
        help="subset to compute (default: all trabecular)",
    )
    p.add_argument(
        "--tb-n",
        default="plate",
        choices=["plate", "direct"],
        help="Tb.N definition: plate (CTAn) or direct (Scanco)",
    )
    p.add_argument("--cortex", help="cortical compartment mask (adds Ct.Th, Ct.Po)")
    p.add_argument(
        "--cortical", action="store_true", help="automatic cortex separation (adds Ct.Th, Ct.Po)"
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="voxel size in mm for files without one",
    )
    p.add_argument(
        "--progress", action="store_true", help="show a progress bar for a single volume too"
    )
    p.add_argument("--json", help="write results as JSON")
    p.add_argument("--csv", help="write results as CSV (one row per volume)")
    p.set_defaults(func=cmd_morpho)
    return parser


def _input_error_in(err: BaseException) -> InputError | None:
    """The InputError behind ``err`` (MONAI wraps errors raised inside bundle expressions)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bone3d: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - turn user-input problems into one line
        found = _input_error_in(err)
        if found is None:
            raise
        print(f"bone3d {args.verb}: error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
