"""`bone3d evaluate`: one SR volume against its HR truth (and the LR input), as files a reviewer reads.

What is computed, with its conventions:

* **Image metrics** (`bone3d.evaluation.image`): PSNR/SSIM in 3D and per axial slice, in the VOI
  and, when a cancellous mask is given, in the cancellous region, for SR and LR. The LR scan is
  first resampled onto the HR grid (trilinear, TorchIO) and mapped to HR units by the least-squares
  line ``a * LR + b`` over the VOI (HU and mg HA/cm^3 are linear in density), so its PSNR/SSIM
  measure structure, not units; ``a`` and ``b`` are reported.
* **Morphometry** (`bone3d.morphometry`, BoneJ conventions): each volume is segmented with its own
  global threshold (ImageJ IsoData by default), computed once over the VOI as a researcher
  segments each scan, and measured in the whole VOI and in ``split^3`` sub-VOIs (the VOI's
  bounding box cut into equal blocks, each intersected with the VOI), which give the points for
  agreement statistics within one specimen. ``threshold_scope="voi"`` computes the threshold
  inside each sub-VOI instead: a local threshold, which in a sparse sub-VOI follows whatever
  grey values are there (an unsure output's blur, an LR scan's noise) and segments them as bone.
  A sub-VOI in which HR holds no bone (`bone_blocks`: under 1 % bone at HR's threshold over the
  whole VOI) is left out for every method and listed in ``blocks_without_bone``.
* **Agreement** (`bone3d.evaluation.stats.agreement`) of SR vs HR and LR vs HR across sub-VOIs,
  per parameter: mean +- SD, bias, paired t, Pearson R/R^2, regression, ICC(2,1), Bland-Altman,
  and the relative errors (mean, median and normalised: `stats.relative_errors`).

Files in ``out_dir``: ``metrics.json`` (everything above), ``voi_metrics.csv`` (one row per VOI
and method), ``slices.png`` (LR/SR/HR triptych with a zoomed trabecular ROI),
``agreement.png`` (per parameter: scatter vs HR with y = x, and Bland-Altman),
``slice_metrics.png`` (box plots of slice-wise PSNR and SSIM per method) and ``report.html``
(one self-contained page: the figures embedded, the tables). With ``tracking_uri`` the numbers go
to an MLflow run as metrics and the files as artifacts.
"""

from __future__ import annotations

import base64
import html
import itertools
import os
import re
import time
from pathlib import Path

import numpy as np
import torchio as tio

from bone3d.errors import InputError
from bone3d.evaluation import stats
from bone3d.evaluation.image import image_metrics
from bone3d.io import check_image, write_csv, write_figure, write_json, write_text

PARAMS = ("bv_tv", "tb_th_mm", "tb_sp_mm", "tb_n_per_mm", "conn_d_per_mm3", "da")
LABELS = {
    "bv_tv": "BV/TV",
    "tb_th_mm": "Tb.Th (mm)",
    "tb_sp_mm": "Tb.Sp (mm)",
    "tb_n_per_mm": "Tb.N (1/mm)",
    "conn_d_per_mm3": "Conn.D (1/mm^3)",
    "da": "DA (1 - l_min/l_max)",
}
METRICS = ("bv_tv", "tb_th", "tb_sp", "tb_n", "connectivity", "da")
MIN_BONE = 0.01  # a sub-VOI with less HR bone than this fraction has no morphometry (bone_blocks)


def _same_grid(a: tio.Image, b: tio.Image) -> bool:
    return tuple(a.spatial_shape) == tuple(b.spatial_shape) and np.allclose(
        a.affine, b.affine, atol=1e-4
    )


def _lr_on_hr(lr: tio.Image, hr: tio.Image) -> np.ndarray:
    if _same_grid(lr, hr):
        return lr.data[0].numpy().astype(np.float32)
    out = tio.Resample(hr, image_interpolation="linear")(tio.Subject(lr=lr))["lr"]
    return out.data[0].numpy().astype(np.float32)


def sub_vois(region: np.ndarray, split: int) -> dict[str, np.ndarray]:
    """The region's bounding box cut into ``split^3`` blocks, each intersected with the region."""
    idx = np.argwhere(region)
    lo, hi = idx.min(0), idx.max(0) + 1
    edges = [np.linspace(a, b, split + 1).round().astype(int) for a, b in zip(lo, hi, strict=True)]
    out = {}
    for i, j, k in itertools.product(range(split), repeat=3):
        m = np.zeros_like(region)
        sl = tuple(slice(e[n], e[n + 1]) for e, n in zip(edges, (i, j, k), strict=True))
        m[sl] = region[sl]
        if m.any():
            out[f"block_{i}{j}{k}"] = m
    return out


def bone_blocks(
    hr: np.ndarray,
    region: np.ndarray,
    split: int,
    threshold: str | float = "isodata",
    min_bone: float = MIN_BONE,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The sub-VOIs of `sub_vois` in which HR holds bone, and the names of those in which it
    does not. A sub-VOI holds bone when at least ``min_bone`` of its voxels are bone in HR
    segmented by one threshold (``threshold``) computed over the whole ``region``. Without bone
    a sub-VOI has no morphometry: a threshold computed inside it (as `voi_morphometry` does)
    splits the noise, giving HR and every method alike BV/TV near 0.5, Tb.Th about one voxel
    and DA near 0, numbers of nothing that would enter the agreement statistics as points."""
    from bone3d.morphometry import segment

    bone, _ = segment(hr, threshold, mask=region)
    blocks = sub_vois(region, split)
    empty = [n for n, voi in blocks.items() if bone[voi].mean() < min_bone]
    return {n: v for n, v in blocks.items() if n not in empty}, empty


THRESHOLD_SCOPES = ("volume", "voi")


def segmentation_threshold(vol, threshold: str | float, scope: str = "volume", mask=None):
    """What `voi_morphometry` segments every sub-VOI of ``vol`` by. ``scope="volume"``: the value
    of ``threshold`` (a method or a number) computed once over ``mask`` (the whole volume when
    None), as a researcher segments a scan; ``"voi"``: ``threshold`` itself, so that a method
    is computed inside each sub-VOI (a local threshold, which in a sparse sub-VOI follows blur
    or noise into the marrow)."""
    from bone3d.morphometry.thresholds import threshold_value

    if scope not in THRESHOLD_SCOPES:
        raise InputError("threshold_scope", f"'volume' or 'voi', not {scope!r}")
    return threshold_value(vol, threshold, mask=mask) if scope == "volume" else threshold


def voi_morphometry(vol, spacing, voi, threshold, *, purify: bool = False) -> dict:
    """`PARAMS` of ``vol`` in ``voi`` (segmented by ``threshold`` computed inside the VOI) and the
    threshold used. ``purify``: BoneJ's Purify on the VOI's bone first (the largest particle,
    enclosed cavities filled), the input BoneJ's Connectivity documentation asks for."""
    from bone3d.morphometry import morphometry, segment
    from bone3d.morphometry.thresholds import purify as _purify

    bone, t = segment(vol, threshold, mask=voi)
    if purify:
        bone = _purify(bone & np.asarray(voi, bool))
    m = morphometry(bone, spacing, voi=voi, metrics=METRICS)
    return {k: m[k] for k in PARAMS} | {"threshold": t}


def _slices_figure(vols: dict[str, np.ndarray], window, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from scipy import ndimage as ndi

    names = list(vols)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.4))
    axes = np.asarray(axes).reshape(2, len(names))
    z = vols["HR"].shape[2] // 2
    ref = vols["HR"][:, :, z].T
    ny, nx = ref.shape
    w, h = max(nx // 4, 4), max(ny // 4, 4)
    # the zoomed ROI: the window of the HR slice with the most bone signal (a trabecular region)
    score = ndi.uniform_filter(ref.astype(np.float64), size=(h, w), mode="constant")
    score[: h // 2, :] = score[ny - h // 2 :, :] = -np.inf
    score[:, : w // 2] = score[:, nx - w // 2 :] = -np.inf
    cy, cx = np.unravel_index(np.argmax(score), score.shape)
    y0, x0 = int(cy - h // 2), int(cx - w // 2)
    for col, name in enumerate(names):
        sl = vols[name][:, :, z].T
        axes[0, col].imshow(sl, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
        axes[0, col].add_patch(Rectangle((x0, y0), w, h, fill=False, ec="yellow", lw=1))
        axes[0, col].set_title(f"{name}, axial slice {z}")
        axes[1, col].imshow(
            sl[y0 : y0 + h, x0 : x0 + w],
            cmap="gray",
            vmin=window[0],
            vmax=window[1],
            origin="lower",
            interpolation="nearest",
        )
        axes[1, col].set_title(f"{name}, zoomed ROI")
        for ax in axes[:, col]:
            ax.axis("off")
    fig.tight_layout()
    return write_figure(fig, path)


def _agreement_figure(rows, methods, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PARAMS), 2, figsize=(9, 3.0 * len(PARAMS)))
    blocks = [r for r in rows if r["voi"] != "voi"]
    colours = dict(zip(methods, ["tab:blue", "tab:orange", "tab:green"], strict=False))
    for row, key in zip(axes, PARAMS, strict=True):
        ref = np.array([r[key] for r in blocks if r["method"] == "HR"], dtype=float)
        lo, hi = np.nanmin(ref) if ref.size else 0, np.nanmax(ref) if ref.size else 1
        for m in methods:
            val = np.array([r[key] for r in blocks if r["method"] == m], dtype=float)
            if val.size != ref.size or not val.size:
                continue
            row[0].scatter(ref, val, s=14, label=m, color=colours[m])
            mean, diff = (val + ref) / 2, val - ref
            row[1].scatter(mean, diff, s=14, label=m, color=colours[m])
            bias, sd = np.nanmean(diff), np.nanstd(diff, ddof=1) if diff.size > 1 else 0.0
            row[1].axhline(bias, color=colours[m], lw=1)
            for s in (-1.96, 1.96):
                row[1].axhline(bias + s * sd, color=colours[m], lw=0.8, ls="--")
            lo, hi = min(lo, np.nanmin(val)), max(hi, np.nanmax(val))
        row[0].plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
        row[0].set_xlabel(f"HR {LABELS[key]}")
        row[0].set_ylabel(LABELS[key])
        row[0].legend(fontsize=7)
        row[1].axhline(0, color="k", lw=0.5)
        row[1].set_xlabel(f"mean of method and HR, {LABELS[key]}")
        row[1].set_ylabel("method - HR")
        row[1].set_title("Bland-Altman (bias, 95 % limits)", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path)


def _box_figure(images: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    names = list(images)
    for ax, key, label in zip(axes, ("psnr_db", "ssim"), ("PSNR (dB)", "SSIM"), strict=True):
        data = [
            [v for v in images[n]["voi"]["slices_axial"][key].get("values", []) if np.isfinite(v)]
            for n in names
        ]
        ax.boxplot(data, tick_labels=names)
        ax.set_title(f"axial slices: {label}")
    fig.tight_layout()
    return write_figure(fig, path)


def _no_bone_note(names: list[str]) -> str:
    if not names:
        return ""
    return (
        f"<p>Left out, without bone in HR (under {MIN_BONE:.0%} at HR's threshold): "
        f"{html.escape(', '.join(names))}.</p>"
    )


def _html(result: dict, files: dict[str, Path], path: Path) -> Path:
    def img(p: Path) -> str:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,{data}">'

    def fmt(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    methods = [m for m in result["methods"] if m != "HR"]
    rows = []
    for m in methods:
        im = result["image_metrics"][m]["voi"]
        rows.append(
            f"<tr><td>{html.escape(m)}</td><td>{fmt(im['psnr_db'])}</td><td>{fmt(im['ssim'])}</td>"
            f"<td>{fmt(im['slices_axial']['psnr_db']['mean'])}</td>"
            f"<td>{fmt(im['slices_axial']['ssim']['mean'])}</td></tr>"
        )
    morpho = []
    for key in PARAMS:
        cells = "".join(f"<td>{fmt(result['voi'][m][key])}</td>" for m in result["methods"])
        errs = "".join(
            f"<td>{fmt(result['agreement'][m][key] and result['agreement'][m][key]['pearson']['r'])}</td>"
            for m in methods
        )
        morpho.append(f"<tr><td>{html.escape(LABELS[key])}</td>{cells}{errs}</tr>")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in result["methods"])
    rhead = "".join(f"<th>R {html.escape(m)} vs HR</th>" for m in methods)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bone3d evaluation: {html.escape(result["name"])}</title>
<style>body{{font-family:sans-serif;margin:2em;background:#fff;color:#111}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #999;padding:4px 8px;text-align:right}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>bone3d evaluation: {html.escape(result["name"])}</h1>
<p>Data range L = {fmt(result["data_range"])} (HR units). Threshold: {html.escape(result["threshold"])}.
Spacing {html.escape(str(result["spacing_mm"]))} mm. {html.escape(result["lr_calibration_note"] or "")}</p>
<h2>Image metrics (VOI)</h2>
<table><tr><th>method</th><th>PSNR 3D (dB)</th><th>SSIM 3D</th><th>PSNR axial mean</th><th>SSIM axial mean</th></tr>
{"".join(rows)}</table>
<h2>Morphometry (whole VOI) and correlation with HR over {result["n_blocks"]} sub-VOIs</h2>
{_no_bone_note(result["blocks_without_bone"])}
<table><tr><th>parameter</th>{head}{rhead}</tr>{"".join(morpho)}</table>
<h2>Slices</h2>{img(files["slices"])}
<h2>Agreement with HR</h2>{img(files["agreement"])}
<h2>Slice-wise image metrics</h2>{img(files["slice_metrics"])}
<p>Every number with its convention is in metrics.json; one row per VOI and method in voi_metrics.csv.</p>
</body></html>
"""
    return write_text(page, path)


def metric_tag(name: str) -> str:
    """A method name as it appears in MLflow metric keys (lower case, [a-z0-9_.-])."""
    return re.sub(r"[^a-z0-9_.-]+", "_", name.lower()).strip("_")


def _flat_metrics(result: dict) -> dict[str, float]:
    out = {}
    for m, block in result["image_metrics"].items():
        tag = metric_tag(m)
        for region, vals in block.items():
            if isinstance(vals, dict):
                out[f"eval_psnr_{region}_{tag}"] = vals["psnr_db"]
                out[f"eval_ssim_{region}_{tag}"] = vals["ssim"]
                for extra in ("niqe_uct", "fd_bone"):
                    if extra in vals:
                        out[f"eval_{extra}_{tag}"] = vals[extra]
    for m, vals in result["voi"].items():
        tag = metric_tag(m)
        for k in PARAMS:
            if vals.get(k) is not None:
                out[f"eval_{k}_{tag}"] = vals[k]
    for m, block in result["agreement"].items():
        tag = metric_tag(m)
        for k, a in block.items():
            if a is not None:
                out[f"eval_{k}_r_{tag}"] = a["pearson"]["r"]
                out[f"eval_{k}_bias_{tag}"] = a["bias"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def evaluate(
    pred: tio.Image,
    hr: tio.Image,
    out_dir: str | os.PathLike,
    *,
    lr: tio.Image | None = None,
    mask: tio.Image | None = None,
    cancellous: tio.Image | None = None,
    data_range: float | None = None,
    threshold: str | float = "isodata",
    threshold_scope: str = "volume",
    split: int = 2,
    name: str = "SR",
    tracking_uri: str | None = None,
    experiment: str = "bone3d-evaluate",
    run_id: str | None = None,
    references: str | os.PathLike | None = None,
    slice_axes: tuple[str, ...] = ("axial",),
) -> dict:
    """Evaluate ``pred`` against ``hr`` (and ``lr``) into ``out_dir``; returns the metrics dict.

    ``slice_axes`` must include "axial" (the box plots show axial slices); add "coronal" and
    "sagittal" for slice-wise metrics along all three axes.
    """
    if "axial" not in slice_axes:
        raise InputError("slice_axes", "must include 'axial'")
    if threshold_scope not in THRESHOLD_SCOPES:  # before the slow work
        raise InputError("threshold_scope", f"'volume' or 'voi', not {threshold_scope!r}")
    t0 = time.perf_counter()
    for img, label in ((pred, "pred"), (hr, "hr")):
        check_image(img, label)
    if not _same_grid(pred, hr):
        raise InputError("pred", "SR volume is not on the HR grid (shape or affine differ)")
    hr_a = hr.data[0].numpy().astype(np.float32)
    sr_a = pred.data[0].numpy().astype(np.float32)
    region = np.ones(hr_a.shape, bool)
    if mask is not None:
        if not _same_grid(mask, hr):
            raise InputError("mask", "mask is not on the HR grid")
        region = mask.data[0].numpy() > 0
        if not region.any():
            raise InputError("mask", "empty mask")
    canc = None
    if cancellous is not None:
        if not _same_grid(cancellous, hr):
            raise InputError("cancellous", "cancellous mask is not on the HR grid")
        canc = cancellous.data[0].numpy() > 0
    if data_range is None:
        data_range = float(hr_a[region].max() - hr_a[region].min())
    vols = {}
    calib = None
    if lr is not None:
        check_image(lr, "lr")
        lr_a = _lr_on_hr(lr, hr)
        a, b = np.polyfit(lr_a[region].astype(np.float64), hr_a[region].astype(np.float64), 1)
        vols["LR"] = (a * lr_a + b).astype(np.float32)
        calib = {"slope": float(a), "intercept": float(b)}
    vols[name] = sr_a
    vols["HR"] = hr_a
    methods = list(vols)
    spacing = tuple(float(s) for s in hr.spacing)

    images = {
        m: image_metrics(
            vols[m], hr_a, data_range, region=region, cancellous=canc, slice_axes=slice_axes
        )
        for m in methods
        if m != "HR"
    }
    refs = {}
    if references is not None:
        import json

        from bone3d.evaluation.fd_bone import FeatureExtractor, fd_bone
        from bone3d.evaluation.niqe import niqe_uct

        ref_dir = Path(references)
        if not (ref_dir / "niqe_uct.json").is_file() or not (ref_dir / "fd_bone.pt").is_file():
            raise InputError(
                references, "expected niqe_uct.json and fd_bone.pt (bone3d fit-references)"
            )
        model = json.loads((ref_dir / "niqe_uct.json").read_text())
        extractor = FeatureExtractor(ref_dir / "fd_bone.pt")
        refs = {"folder": str(ref_dir.resolve()), "fd_bone_net_sha256": extractor.sha256}
        for m in methods:
            refs[m] = {"niqe_uct": niqe_uct(vols[m], model)}
            if m != "HR":
                refs[m]["fd_bone"] = fd_bone(vols[m], hr_a, extractor)
                images[m]["voi"].update(refs[m])
    blocks, no_bone = bone_blocks(hr_a, region, split, threshold)
    rows = []
    per_voi = {}
    from tqdm import tqdm

    # per volume: one value over the VOI, the whole-VOI row segmented by the same value
    level = {
        m: segmentation_threshold(vols[m], threshold, threshold_scope, region) for m in methods
    }
    vois = [("voi", region), *blocks.items()]
    for voi_name, voi in tqdm(vois, desc="morphometry", unit="VOI", disable=None):
        for m in methods:
            vals = voi_morphometry(vols[m], spacing, voi, level[m])
            rows.append({"voi": voi_name, "method": m, **vals})
            if voi_name == "voi":
                per_voi[m] = vals
    agreement: dict = {}
    for m in methods:
        if m == "HR":
            continue
        agreement[m] = {}
        for key in PARAMS:
            x = [r[key] for r in rows if r["voi"] != "voi" and r["method"] == m]
            y = [r[key] for r in rows if r["voi"] != "voi" and r["method"] == "HR"]
            try:
                agreement[m][key] = stats.agreement(x, y)
            except (InputError, ValueError, TypeError, AssertionError):
                agreement[m][key] = None  # too few sub-VOIs, nulls or no variance
    result = {
        "name": name,
        "methods": methods,
        "spacing_mm": list(spacing),
        "data_range": float(data_range),
        "threshold": f"{threshold}, "
        + (
            "computed once per volume over the VOI (each method its own), applied in every sub-VOI"
            if threshold_scope == "volume"
            else "computed inside each sub-VOI, for each method"
        ),
        "threshold_scope": threshold_scope,
        "lr_calibration": calib,
        "lr_calibration_note": None
        if calib is None
        else f"LR trilinear on the HR grid, mapped to HR units by {calib['slope']:.4g} * LR + "
        f"{calib['intercept']:.4g} (least squares over the VOI).",
        "voi_voxels": int(region.sum()),
        "n_blocks": len(blocks),
        "blocks_without_bone": no_bone,
        "image_metrics": images,
        "voi": per_voi,
        "agreement": agreement,
        "reference_metrics": refs or None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    window = (float(np.percentile(hr_a, 0.5)), float(np.percentile(hr_a, 99.5)))
    files = {
        "slices": _slices_figure(vols, window, out / "slices.png"),
        "agreement": _agreement_figure(
            rows, [m for m in methods if m != "HR"], out / "agreement.png"
        ),
        "slice_metrics": _box_figure(images, out / "slice_metrics.png"),
    }
    files["csv"] = write_csv(rows, out / "voi_metrics.csv", ["voi", "method", *PARAMS, "threshold"])
    result["elapsed_s"] = time.perf_counter() - t0
    result["files"] = {k: str(v) for k, v in files.items()} | {"json": str(out / "metrics.json")}
    files["html"] = _html(result, files, out / "report.html")
    result["files"]["html"] = str(files["html"])
    files["json"] = write_json(result, out / "metrics.json")

    if tracking_uri:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        new_run = run_id is None
        if new_run:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            run_id = client.create_run(exp_id, run_name=f"evaluate-{name}").info.run_id
        for k, v in _flat_metrics(result).items():
            client.log_metric(run_id, k, v)
        for p in files.values():
            client.log_artifact(run_id, str(p), artifact_path="evaluation")
        if new_run:
            client.set_terminated(run_id)
        result["mlflow_run_id"] = run_id
    return result
