"""Morphometric fidelity of super-resolution: does bone3d beat the low-res input on every bone
parameter, on specimens never seen in training?

Data (HR at 50 um, 96^3 voxels = 4.8 mm cubes, mg HA/cm^3):

* the BoneBox L1 vertebral ROIs in ``../shared/data/bonebox_l1_trabecular_rois`` (binary micro-CT,
  50 um as the BoneBox code assumes), centre-cropped and given grey values by the phantom
  intensity model (`bone3d.data.phantom.render_grey`);
* the LHDL human trabecular core (``lhdl_human_trabecular_uct``, grey micro-CT at 19.5 um), mapped
  to mg HA/cm^3 by its two IsoData class means (marrow 0, tissue 1000) and area-averaged to 50 um;
* generated phantoms (`bone3d.data.phantom`), for more training variety: two trabecular ones
  filling their box, and two with a cortical shell and wide empty space outside it
  (``--cortical-phantoms``; see `hr_volumes`), and two low-density ones, most of their bone
  perforated away (``--sparse-phantoms``, 2 by default since 2026-11-24).

Split by **donor**: test and validation volumes are whole BoneBox specimens (every ROI of a donor
in one split), chosen with the seed; everything else trains. Each HR volume is degraded with each
preset (``hrpqct``, ``mdct``; `bone3d.data.simulate`).

Methods, per degradation: the LR input resampled to the HR grid (trilinear, and cubic B-spline;
TorchIO/SimpleITK), and for every bundle x variant the model trained through ``python -m
monai.bundle run`` with its own loss and with ``common/morphometry_loss_base.json``
(`bone3d.losses.MorphometryLoss`), 30 epochs (the U-Net 3D 60), and each U-Net + loss model
fine-tuned 30 epochs more by pix2pix's paired GAN step (rows ``unet_sr-3d+morpho+gan``,
``unet_sr-2p5d+morpho+gan``; `gan_stage_args`), then rebuilt whole with ``bone3d infer
--self-ensemble``
(every model's output averaged over the mirrored inputs, the EDSR+ protocol:
`bone3d.inference.ensemble`; ``--no-self-ensemble`` scores single passes into
``fidelity_single_pass.json``, MLflow metrics ``fid_single_pass_*``, and exports nothing).

Scores on the test and validation volumes, all on one region fixed by the data (``scored_shape``: 88^3): PSNR
and SSIM (3D, MONAI, data range = the HR window width), and per 44^3 sub-VOI (8 per volume)
BV/TV, Tb.Th, Tb.Sp, Tb.N, Conn.D, DA, each volume (HR and every method) segmented by its
own ImageJ IsoData threshold computed once over the scored region, as `bone3d evaluate` does
(`bone3d.evaluation.report.voi_morphometry`, BoneJ conventions; sub-VOIs without bone in HR left
out, `bone3d.evaluation.report.bone_blocks`):
mean absolute relative error vs HR, Pearson R and ICC(2,1) across the VOIs of each split
(`bone3d.evaluation.stats.agreement`). LR rows are listed for comparison.

The validation donors (``--validation``, 2; never trained on: the trainings only report a
validation PSNR at their last epoch) **choose the best model**: the lowest
``fidelity_vs_lr`` on validation, the mean over BV/TV, Tb.Th, Tb.Sp, Conn.D and DA of the error
divided by trilinear LR's, so that each parameter counts equally. The acceptance checks then read
that model's test scores, which took no part in the choice.

Writes one MLflow experiment ``bone3d-fidelity`` (training runs with their ``fid_*`` test and
``fid_val_*`` validation scores, baseline runs) into ``WORK/mlruns.db``,
``benchmarks/results/fidelity.json`` (every row, the split, timings, the acceptance checks) and
the best model under ``hrpqct`` as an exported bundle in ``benchmarks/results/best_bundle/``
(`bone3d export`, weights included).

``--train-seeds 0 1 2`` (a spread check): every model trains once per seed on the same data;
each score is the mean over the seeds with its SD, written to ``fidelity_seeds.json``. Each
such model also gets a row ``name@ensemble``: the voxel-wise mean of its seeds' SR volumes
(a deep ensemble, `seed_ensembles`), scored like any method; it takes no part in choosing the
best model.

    .venv/bin/python benchmarks/fidelity.py                 # everything (2 h budget on 2 cores)
    .venv/bin/python benchmarks/fidelity.py --degradations hrpqct --variants 3d --models unet_sr

``--purify`` rescoring (a sensitivity check, not the headline protocol): each sub-VOI's bone is
purified before morphometry, HR and every method alike (BoneJ Purify: the largest 26-connected
particle, enclosed marrow filled; BoneJ's Connectivity asks for one particle). It writes
``benchmarks/results/fidelity_purified.json`` and MLflow metrics ``fid_purified_*``, exports
nothing, and reuses the trained models and SR volumes of ``WORK``.

``--threshold voi`` and ``--threshold 500`` rescorings (sensitivity checks of the
segmentation, HR and every method alike): IsoData computed inside each sub-VOI instead of once
per volume, or one fixed grey value in mg HA/cm^3 for every volume (Scanco's convention). A
threshold computed inside a sparse sub-VOI follows whatever grey values are there, blur and
noise included; one per volume or a fixed one does not. Each writes
``fidelity_thr_<value>.json`` and MLflow metrics ``fid_thr_<value>_*``, exports nothing, and
reuses the trained models and SR volumes.

Trials: ``--bundle-args='--loss#threshold otsu_each'`` appends arguments to every ``monai.bundle
run`` training; it needs ``--out`` and a ``--work`` of its own (a work folder trained with other
arguments or epochs is refused) and exports nothing. ``--epochs-3d`` / ``--epochs-2p5d`` with ``--out`` and
a new ``--work`` try other training lengths, ``--patch-3d N`` other 3D patch sides (32 by default:
1.6 mm at the benchmark's 0.05 mm HR voxels). ``--regressor WEIGHT`` fits the frozen morphometry
regressor (``bone3d fit-regressor``) on the training HR volumes into the work folder and adds
its term to every +morpho training; ``--regressor-level isodata`` labels its patches at one level
(the training HR volumes' pooled IsoData) instead of each patch's own Otsu. ``--gan-stage
MODEL...`` fine-tunes each named pre-upsampling bundle's +morpho generator 30 epochs more by
pix2pix's paired GAN step (`gan_stage_args`; rows ``NAME+morpho+gan``), and ``--model-epochs
BUNDLE-VARIANT=N`` trains one model longer; ``--model-epochs unet_sr-3d=60 --gan-stage
unet_sr`` is the setting recommended by the outer-fold trial of 2026-11-24, run as the whole
table into ``fidelity_gan_stage_60ep.json`` and not adopted; with ``--sparse-phantoms 2`` it
was adopted the same day and is the default (other values of the two flags are trials;
``--gan-stage`` with no model: no stage).

Cross-validation: ``--fold K`` (K > 0) keeps the test donors, takes the validation donors from
the next places of the same seeded order (the earlier ones train; `donor_split`) and scores the
validation volumes only; ``benchmarks/cross_validation.py`` pools the folds' validation rows.

Missed sub-VOIs: where HR has bone and a method segments none, its undefined values count as
100 % errors (`bone3d.evaluation.stats.error_pairs`). ``--resummarise FILE...`` recomputes
existing result files' summaries and acceptance from their rows with the current rules.

Trained models are kept in ``WORK`` (``benchmarks/results/work``, not committed): a rerun skips
finished trainings and resumes interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
HR_MM = 0.05
SIZE = 96
HR_RANGE = (-200.0, 1200.0)  # the phantoms' window, mg HA/cm^3
SCORE_MULTIPLE = 8  # scored region: HR shape floored to a multiple of this (see scored_shape)
FIDELITY = ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3", "da")  # the acceptance parameters
EXPERIMENT = "bone3d-fidelity"
PURIFIED_OUT = RESULTS / "fidelity_purified.json"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data -------------------------------------------------------------------------------------


def _centre_crop(a: np.ndarray, n: int) -> np.ndarray:
    lo = [(s - n) // 2 for s in a.shape]
    return a[tuple(slice(max(o, 0), max(o, 0) + n) for o in lo)]


# The low-density phantoms (``--sparse-phantoms``): a trabecular phantom with half to 70 % of its
# bone perforated away (`bone3d.data.phantom`, ``perforation``), BV/TV about 0.03-0.08: down to the
# BoneBox collection's minimum (0.041 over its 208 ROIs, ``roi_bvtv_all208.npy``; 5th percentile
# 0.063) and below, as in the sparse sub-VOIs of a low-density ROI, where the other phantoms
# (BV/TV 0.08-0.3) never go.
SPARSE_BV_TV = (0.10, 0.16)
SPARSE_PERFORATION = (0.5, 0.7)


def hr_volumes(n_phantoms: int, seed: int, n_cortical: int = 0, n_sparse: int = 0) -> list[dict]:
    """Every HR volume: ``{"id", "donor", "source", "image"}`` (tio image, mg HA/cm^3, 50 um).

    ``n_phantoms`` trabecular phantoms fill their whole box; ``n_cortical`` more
    (``cortical00``...) are the corner of a wider phantom with a porous cortical shell
    (`bone3d.data.phantom`, ``cortex=True``): trabeculae, the shell and empty space outside it
    (about 40 % of the box farther than 0.75 mm from bone), as an ROI at the edge of a vertebral
    body. Besides one BoneBox ROI, they are the only training volumes with wide bone-free space,
    where a model that never saw any draws trabeculae into the noise. Last, ``n_sparse``
    (``sparse00``...) fill their box too, with most of their bone perforated away
    (`SPARSE_PERFORATION`)."""
    from bone3d.data.phantom import PhantomSpec, make_phantom, render_grey
    from bone3d.data.prepare import two_class_means
    from bone3d.data.simulate import area_resample
    from bone3d.io import make_image, read_volume

    sp = (HR_MM,) * 3
    out = []
    for f in sorted((DATA / "bonebox_l1_trabecular_rois").glob("isodata_*_roi_*.nrrd")):
        donor, roi = re.match(r"isodata_(\d+)_roi_(\d+)", f.name).groups()
        bone = _centre_crop(read_volume(f, spacing=sp).data[0].numpy() > 0, SIZE)
        grey = render_grey(bone, PhantomSpec(), rng=seed * 1000 + int(roi))
        out.append(
            {"id": f"bonebox_{donor}_{roi}", "donor": f"bonebox_{donor}", "source": str(f),
             "image": make_image(grey, spacing=sp)}
        )  # fmt: skip
    lhdl = next((DATA / "lhdl_human_trabecular_uct").glob("*.nii.gz"))
    img = read_volume(lhdl)
    a = img.data[0].numpy().astype(np.float32)
    lo, hi = two_class_means(a)
    a = PhantomSpec().marrow_mgha + (a - lo) / (hi - lo) * PhantomSpec().tissue_mgha
    a = area_resample(a, img.spacing, sp)
    out.append({"id": "lhdl_3155", "donor": "lhdl_3155", "source": str(lhdl),
                "image": make_image(a, spacing=sp)})  # fmt: skip
    rng = np.random.default_rng(seed)

    def trabecular():  # one draw of the trabecular parameters, in the order the seed fixes
        return {"bv_tv": float(rng.uniform(0.08, 0.3)), "tb_th_mm": float(rng.uniform(0.12, 0.22)),
                "rod_fraction": float(rng.uniform(0.2, 0.8)),
                "anisotropy": float(rng.uniform(1.0, 1.6))}  # fmt: skip

    for i in range(n_phantoms):
        ph = make_phantom(shape=(SIZE,) * 3, spacing_mm=HR_MM, seed=seed * 1000 + 500 + i,
                          **trabecular())  # fmt: skip
        out.append({"id": f"phantom{i:02d}", "donor": f"phantom{i:02d}", "source": "phantom",
                    "image": ph.image})  # fmt: skip
    for i in range(n_cortical):
        wide = (SIZE * 8 // 3, SIZE * 8 // 3, SIZE)  # 256^2: the box's corner is outside
        ph = make_phantom(
            shape=wide, spacing_mm=HR_MM, **trabecular(), cortex=True,
            ct_th_mm=float(rng.uniform(0.3, 0.6)), n_pores=int(rng.integers(5, 30)),
            seed=seed * 1000 + 700 + i,
        )  # fmt: skip
        corner = ph.image.data[0, :SIZE, :SIZE].numpy()
        out.append({"id": f"cortical{i:02d}", "donor": f"cortical{i:02d}",
                    "source": "phantom, cortical shell", "image": make_image(corner, spacing=sp)})  # fmt: skip
    # the low-density phantoms draw from a stream of their own: the volumes above stay as they were
    sparse = np.random.default_rng([seed, 31])
    for i in range(n_sparse):
        ph = make_phantom(
            shape=(SIZE,) * 3, spacing_mm=HR_MM, seed=seed * 1000 + 900 + i,
            bv_tv=float(sparse.uniform(*SPARSE_BV_TV)),
            tb_th_mm=float(sparse.uniform(0.12, 0.16)),
            rod_fraction=float(sparse.uniform(0.5, 0.9)),
            anisotropy=float(sparse.uniform(1.0, 1.6)),
            perforation=float(sparse.uniform(*SPARSE_PERFORATION)),
        )  # fmt: skip
        out.append({"id": f"sparse{i:02d}", "donor": f"sparse{i:02d}",
                    "source": "phantom, low density", "image": ph.image})  # fmt: skip
    return out


def donor_split(
    volumes: list[dict], n_test: int, n_val: int, seed: int, fold: int = 0, test_fold: int = 0
) -> dict[str, list[str]]:
    """Test and validation donors drawn (seeded) from the single-ROI BoneBox donors; the donor
    with several ROIs, LHDL and the phantoms always train. Returns volume ids per split.

    ``fold`` k > 0 keeps the test donors and takes the validation donors from the next ``n_val``
    places of the same seeded order (k = 0 is the headline split; donor-wise cross-validation
    over the non-test donors, so that a setting can be judged on more donors than one split
    holds); the previous validation donors then train.

    ``test_fold`` t > 0 rotates the seeded order by ``t * n_test`` places first, so the test
    donors are the order's t-th block of ``n_test`` and validation follows them (cyclically):
    test folds 0, 1, ... test disjoint donors, and with ``n_test`` dividing their number every
    single-ROI donor is tested once (outer cross-validation; t = 0 is the headline split)."""
    donors = sorted({v["donor"] for v in volumes})
    per = {d: [v["id"] for v in volumes if v["donor"] == d] for d in donors}
    candidates = [d for d in donors if d.startswith("bonebox_") and len(per[d]) == 1]
    order = list(np.random.default_rng(seed).permutation(candidates))
    start = test_fold * n_test
    if test_fold < 0 or start + n_test > len(order):
        raise ValueError(
            f"test fold {test_fold}: {len(order)} single-ROI donors hold "
            f"{len(order) // max(n_test, 1)} test folds of {n_test}"
        )
    order = order[start:] + order[:start]
    lo = n_test + fold * n_val
    if fold < 0 or lo + n_val > len(order):
        raise ValueError(
            f"fold {fold}: {len(order) - n_test} non-test single-ROI donors hold "
            f"{(len(order) - n_test) // max(n_val, 1)} folds of {n_val} validation donors"
        )
    test, val = order[:n_test], order[lo : lo + n_val]
    ids = {
        "test": [i for d in test for i in per[d]],
        "validation": [i for d in val for i in per[d]],
    }
    ids["training"] = [v["id"] for v in volumes if v["id"] not in ids["test"] + ids["validation"]]
    return ids


def build_dataset(volumes, split, preset: str, out: Path, seed: int) -> Path:
    from bone3d.data.datalist import split_hash, write_datalist
    from bone3d.data.prepare import write_specimen
    from bone3d.data.simulate import degrade, get_preset

    path = out / "datalist.json"
    if path.is_file():  # reused with the trainings beside it: only for the same split
        old = json.loads(path.read_text())
        if old.get("split_hash") != split_hash(split):
            print(f"{path} holds another split (test {[i['specimen'] for i in old['test']]}, "
                  f"validation {[i['specimen'] for i in old['validation']]}); its trainings do "
                  "not fit this one: use a new --work", file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
        return path
    p = get_preset(preset)
    items = []
    for i, v in enumerate(volumes):
        d = degrade(v["image"], p, seed=seed * 1000 + i)
        items.append(write_specimen(out / v["id"], v["id"], v["image"], d))
    return write_datalist(
        path, items, split, split_seed=seed, preset=preset, misaligned=False,
        hr_units="mg HA/cm^3", hr_range=list(HR_RANGE),
        lr_range=[p.hu_slope * x + p.hu_intercept for x in HR_RANGE],
        hr_spacing_mm=[HR_MM] * 3, name=f"fidelity-{preset}",
    )  # fmt: skip


# --- training and inference -----------------------------------------------------------------


def _py(args: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        res = subprocess.run([sys.executable, *args], stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed; see {log}")


def train(bundle: str, variant: str, morpho: bool, datalist: Path, run_dir: Path, db: Path,
          epochs: dict, seed: int = 0, extra: list[str] | None = None,
          patch_3d: int = 32) -> dict:  # fmt: skip
    """One training through ``monai.bundle run`` with the bundle's ``seed`` set to ``seed``
    (weight initialisation, patch sampling; `monai.utils.set_determinism`) and ``extra``
    arguments appended (``--bundle-args``); skipped when ``run_dir`` holds a finished one,
    refused when that one was trained with other ``extra`` arguments, epochs or 3D patch side
    (``patch_3d`` HR voxels, batches of 4)."""
    from bone3d.engines import bundle_cli_args

    b = ROOT / "bundles" / bundle
    ckpt = run_dir / "models"
    done = run_dir / "done.json"
    extra = list(extra or [])
    n_ep = epochs[variant]
    if done.is_file():  # reused: its train_s is the original training's time
        info = json.loads(done.read_text())
        had = {"epochs": info.get("epochs"), "bundle arguments": info.get("bundle_args", []),
               "3D patch": info.get("patch_3d", 32) if variant == "3d" else None}  # fmt: skip
        asked = {"epochs": n_ep, "bundle arguments": extra,
                 "3D patch": patch_3d if variant == "3d" else None}  # fmt: skip
        if had != asked:
            print(f"{run_dir} was trained with {had}, not {asked}: use a new --work",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
        return {"train_seed": seed, **info, "reused": True}
    cfg = json.loads((b / "configs" / "train.json").read_text())
    scale = cfg.get("scale") or 1
    names = ["train", variant] + (["morphometry_loss"] if morpho else [])
    if variant == "3d":
        shape = ["--patch_size", f"[{patch_3d},{patch_3d},{patch_3d}]", "--batch_size", "4"]
    else:
        shape = ["--patch_size", f"[64,64,{5 * scale}]", "--batch_size", "8"]
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    _py(
        ["-m", "monai.bundle", "run", *bundle_cli_args(b, *names), "--tracking", "mlflow",
         "--bundle_root", str(b), "--datalist", str(datalist), "--ckpt_dir", str(ckpt),
         "--output_dir", str(run_dir / "runs"), "--tracking_uri", f"sqlite:///{db}",
         "--experiment_name", EXPERIMENT, "--net_preset", "cpu3d", *shape,
         "--max_epochs", str(n_ep), "--val_interval", str(n_ep), "--samples_per_volume", "4",
         "--queue_length", "32", "--seed", str(seed), *extra],
        run_dir / "train.log",
    )  # fmt: skip
    info = {
        "bundle": bundle, "variant": variant, "morphometry_loss": morpho, "epochs": n_ep,
        "train_seed": seed, "train_s": round(time.perf_counter() - t0, 1), "checkpoint": str(ckpt / "model.pt"),
        "run_name": json.loads((ckpt / "run.json").read_text())["run_name"],
    }  # fmt: skip
    if extra:
        info["bundle_args"] = extra
    if variant == "3d" and patch_3d != 32:
        info["patch_3d"] = patch_3d
    done.write_text(json.dumps(info, indent=1))
    return info


def infer(bundle: str, variant: str, checkpoint: str, lr: str, out: Path, log: Path,
          ensemble: bool = True) -> Path:  # fmt: skip
    if not out.is_file():
        _py(["-m", "bone3d.cli", "infer", str(ROOT / "bundles" / bundle), lr, "-o", str(out),
             "--variant", variant, "--checkpoint", checkpoint,
             *(["--self-ensemble"] if ensemble else [])], log)  # fmt: skip
    return out


def sr_folder(work: Path, deg: str, ensemble: bool) -> Path:
    """Where the SR volumes of one protocol are kept (reused by a rerun)."""
    return work / deg / ("sr-ensemble" if ensemble else "sr")


# --- scoring --------------------------------------------------------------------------------


def _on_hr(lr, hr, interpolation: str) -> np.ndarray:
    import torchio as tio

    out = tio.Resample(hr, image_interpolation=interpolation)(tio.Subject(lr=lr))["lr"]
    return out.data[0].numpy().astype(np.float32)


def scored_shape(hr_shape) -> tuple[int, ...]:
    """The region every method is scored on: the HR grid's first ``(n // SCORE_MULTIPLE) *
    SCORE_MULTIPLE`` voxels per axis. It depends on the data alone, so a method's scores do not
    change with the other methods in the run (post-upsampling outputs cover whole multiples of
    their scale, up to 4, so they are at most 3 voxels short of the HR grid)."""
    return tuple((n // SCORE_MULTIPLE) * SCORE_MULTIPLE for n in hr_shape)


def score_volume(
    vols: dict[str, np.ndarray],
    hr: np.ndarray,
    *,
    purify: bool = False,
    threshold: str | float = "volume",
) -> list[dict]:
    """PSNR/SSIM per method and morphometry per sub-VOI for methods and HR, all on the region
    ``scored_shape(hr.shape)``; sub-VOIs without bone in HR are left out (`bone3d evaluate`'s
    rule, `bone3d.evaluation.report.bone_blocks`: the validation ROI of donor 07131 reaches
    past the trabecular bone into empty space); ``purify``: each sub-VOI's bone purified first
    (BoneJ Purify, HR and every method alike).

    ``threshold`` (HR and every method alike): ``"volume"`` (the headline protocol, as `bone3d
    evaluate` segments a scan) ImageJ IsoData computed once over each volume's scored region,
    then applied in every sub-VOI; ``"voi"`` IsoData computed inside each sub-VOI, a local
    threshold that in a sparse sub-VOI follows an output's blur or LR's noise into the marrow
    (the protocol until 2026-11-23); a number: that fixed grey value in mg HA/cm^3
    for every volume, Scanco's convention of one density threshold for all scans of a study
    (Bouxsein et al. 2010, JBMR 25:1468), meaningful here because SR and the least-squares
    scaled LR are in HR's units."""
    from bone3d.evaluation.image import psnr, ssim
    from bone3d.evaluation.report import bone_blocks, segmentation_threshold, voi_morphometry

    if isinstance(threshold, str) and threshold not in ("voi", "volume"):
        raise ValueError(f"threshold: 'voi', 'volume' or a number (mg HA/cm^3), not {threshold!r}")
    shape = scored_shape(hr.shape)
    for name, v in vols.items():
        if any(a < b for a, b in zip(v.shape, shape, strict=True)):
            raise ValueError(f"{name}: output {v.shape} does not cover the scored region {shape}")
    cut = tuple(slice(0, n) for n in shape)
    hr = hr[cut]
    rng = HR_RANGE[1] - HR_RANGE[0]
    rows = []
    blocks, _ = bone_blocks(hr, np.ones(shape, bool), 2)
    for name, v in {**vols, "HR": hr}.items():
        v = v[cut]
        img = {} if name == "HR" else {"psnr_db": psnr(v, hr, rng), "ssim": ssim(v, hr, rng)}
        method = "isodata" if isinstance(threshold, str) else float(threshold)
        t = segmentation_threshold(v, method, "voi" if threshold == "voi" else "volume")
        for bname, voi in blocks.items():
            m = voi_morphometry(v, (HR_MM,) * 3, voi, t, purify=purify)
            rows.append({"method": name, "voi": bname, **img, **m})
    return rows


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per method (each training seed its own: ``name@seedN``): mean PSNR/SSIM, and per
    parameter MARE, Pearson R, ICC(2,1) vs HR across the VOIs of ``rows``.

    MARE is taken over every VOI where HR's value is defined and non-zero; a VOI where the
    method's value is undefined (it segmented no bone there) counts as a 100 % error
    (`bone3d.evaluation.stats.error_pairs`), and ``<p>_n_missed`` says how many there were.
    R and ICC are over the VOIs where both values are defined."""
    from bone3d.evaluation import stats
    from bone3d.evaluation.report import PARAMS

    hr = {(r["specimen"], r["voi"]): r for r in rows if r["method"] == "HR"}
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "HR"):
        mine = [r for r in rows if r["method"] == m]
        s = {
            "psnr_db": float(np.mean([r["psnr_db"] for r in mine])),
            "ssim": float(np.mean([r["ssim"] for r in mine])),
            "n_voi": len(mine),
        }
        for p in PARAMS:
            x = np.array([r[p] if r[p] is not None else np.nan for r in mine], float)
            y = np.array([hr[(r["specimen"], r["voi"])][p] for r in mine], float)
            xe, ye, missed = stats.error_pairs(x, y)
            s[f"{p}_mare"] = float(np.mean(np.abs(xe - ye) / np.abs(ye)))
            s[f"{p}_n_missed"] = missed
            ok = np.isfinite(x) & np.isfinite(y) & (y != 0)
            try:
                a = stats.agreement(x[ok], y[ok])
                s[f"{p}_r"], s[f"{p}_icc"] = a["pearson"]["r"], a["icc"]["icc"]
            except Exception:  # no variance or too few VOIs: agreement undefined, say so
                s[f"{p}_r"] = s[f"{p}_icc"] = None
        s["fidelity_mare"] = float(np.mean([s[f"{p}_mare"] for p in FIDELITY]))
        out[m] = s
    # the raw mean above lets Conn.D (errors of 100-500 %) swamp DA (3-20 %): rank by the errors
    # relative to trilinear LR's instead, each parameter counting equally (1.0 = as good as LR)
    lr = out.get("LR trilinear")
    for s in out.values():
        s["fidelity_vs_lr"] = (
            float(np.mean([s[f"{p}_mare"] / lr[f"{p}_mare"] for p in FIDELITY])) if lr else None
        )
    return out


def _label(info: dict) -> str:
    if info.get("stage_of"):  # a GAN stage on a trained generator (``--gan-stage``)
        return f"{info['stage_of']}-{info['variant']}+morpho+gan"
    return f"{info['bundle']}-{info['variant']}" + ("+morpho" if info["morphometry_loss"] else "")


GAN_STAGE_EPOCHS = 30
# The headline's defaults since 2026-11-24: the U-Net 3D trains 60 epochs (every other model 30)
# and each U-Net + loss model gets the GAN stage, with two low-density training phantoms
# (--sparse-phantoms 2). Without those phantoms the same setting fragmented a near-empty
# validation sub-VOI and was not adopted (fidelity_gan_stage_60ep.json); with them it was, by
# the rule written before the run (benchmarks/results/README.md, "Low-density training
# phantoms").
GAN_STAGE_MODELS: tuple[str, ...] = ("unet_sr",)
MODEL_EPOCHS: tuple[str, ...] = ("unet_sr-3d=60",)


def _model_epochs(text: str) -> tuple[str, str, int]:
    """argparse type of ``--model-epochs``: ``BUNDLE-VARIANT=N`` -> (bundle, variant, N)."""
    m = re.fullmatch(r"(\w+)-(3d|2p5d)=(\d+)", text)
    if not m or int(m[3]) < 1:
        raise argparse.ArgumentTypeError(
            f"BUNDLE-VARIANT=N with a variant 3d or 2p5d and N >= 1 (unet_sr-3d=60), not {text!r}"
        )
    return m[1], m[2], int(m[3])


def gan_stage_args(bundle: str, checkpoint: str) -> list[str]:
    """``monai.bundle run`` arguments of ``--gan-stage`` (the settings of the recommended trial
    in ``benchmarks/results/README.md``, "Adversarial fine-tuning of the U-Net"): the pix2pix
    bundle's paired GAN step (conditional PatchGAN, vanilla loss, content 100 : GAN 1, the
    morphometry loss as its content term from the start) fine-tuning ``bundle``'s trained
    generator ``checkpoint`` (ESRGAN's recipe) at a learning rate of 1e-4 for G and D."""
    cfg = json.loads((ROOT / "bundles" / bundle / "configs" / "train.json").read_text())
    if cfg.get("scale"):
        raise ValueError(
            f"--gan-stage: {bundle} up-samples after the network; pix2pix's conditional "
            "discriminator needs a pre-upsampling generator"
        )
    return ["--model_name", cfg["model_name"], "--pretrained_g", str(checkpoint),
            "--learning_rate", "0.0001", "--d_learning_rate", "0.0001",
            "--morphometry_loss_pretrain", "0"]  # fmt: skip


def _run_key(info: dict) -> str:
    """The method label of one training; seeds other than 0 add ``@seedN``."""
    seed = info.get("train_seed", 0)
    return _label(info) + (f"@seed{seed}" if seed else "")


ENSEMBLE = "@ensemble"  # the method-label suffix of a seed ensemble (no "@seed" in it)


def seed_ensembles(vols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The seed ensembles of ``vols`` (method label -> SR volume on one grid): for every model
    trained with several seeds (``name``, ``name@seedN``), ``name@ensemble``, the voxel-wise mean
    of its seeds' volumes. The deep ensemble of Lakshminarayanan et al. 2017 (NeurIPS,
    "Simple and scalable predictive uncertainty estimation using deep ensembles"): trainings
    that differ only in initialisation and patch order disagree most on what each invents,
    so their mean keeps the structure they share, as the mirror self-ensemble does for one
    network. A plain mean of saved volumes, which no library call does for us. Models with
    one seed, and the baselines, have none."""
    groups: dict[str, list[str]] = {}
    for key in vols:
        groups.setdefault(key.split("@seed")[0], []).append(key)
    out = {}
    for label, keys in groups.items():
        if len(keys) < 2 or label not in keys:
            continue
        shapes = {vols[k].shape for k in keys}
        if len(shapes) > 1:
            raise ValueError(f"{label}: its seeds' volumes differ in shape {sorted(shapes)}")
        out[label + ENSEMBLE] = np.mean([vols[k] for k in keys], axis=0).astype(np.float32)
    return out


def pool_seeds(summary: dict[str, dict]) -> dict[str, dict]:
    """The trainings of one model with different seeds (``name``, ``name@seedN``) pooled: each
    score is the mean over the seeds and ``<score>_sd`` its sample standard deviation
    (ddof 1), ``seeds`` lists them. Baselines and single trainings pass unchanged. Pearson R
    and ICC are pooled the same way, as the mean of the per-seed coefficients."""
    groups: dict[str, list[str]] = {}
    for key in summary:
        groups.setdefault(key.split("@seed")[0], []).append(key)
    out = {}
    for label, keys in groups.items():
        if keys == [label]:
            out[label] = summary[label]
            continue
        pooled: dict = {}
        for name in summary[keys[0]]:
            vals = [summary[k][name] for k in keys]
            if any(v is None for v in vals):
                pooled[name] = None
                continue
            pooled[name] = float(np.mean(vals))
            if len(vals) > 1:
                pooled[f"{name}_sd"] = float(np.std(vals, ddof=1))
        pooled["seeds"] = [int(k.split("@seed")[1]) if "@seed" in k else 0 for k in keys]
        out[label] = pooled
    return out


def _with_and_without(s: dict[str, dict], models: list[str], suffix: str) -> dict:
    """Each model ``NAME + suffix`` of ``models`` against ``NAME`` on the same VOIs (scores
    ``s``): both "vs LR" and PSNRs, whether the suffix lowers "vs LR", and whether its PSNR is
    within 0.5 dB (the issue's margin for the morphometry loss)."""
    out = {}
    for m in models:
        base = m.removesuffix(suffix)
        if m == base or base not in s:
            continue
        out[base] = {
            "fidelity_vs_lr": [s[base]["fidelity_vs_lr"], s[m]["fidelity_vs_lr"]],
            "psnr_db": [s[base]["psnr_db"], s[m]["psnr_db"]],
            "improves": s[m]["fidelity_vs_lr"] < s[base]["fidelity_vs_lr"],
            "psnr_within_0.5db": s[m]["psnr_db"] >= s[base]["psnr_db"] - 0.5,
        }
    return out


def acceptance(
    summary: dict[str, dict[str, dict]],
    trained: dict[str, list[str]],
    validation: dict[str, dict[str, dict]] | None = None,
) -> dict:
    """The issue's criteria on the test scores ``summary``, each with the numbers it was
    decided on. The best model is chosen by the lowest ``fidelity_vs_lr`` on the
    ``validation`` scores (a donor outside training and test) where the degradation has them,
    so that the test VOIs judge a choice they did not make; else on the test scores."""
    out = {}
    for deg, s in summary.items():
        if "LR trilinear" not in s:  # a cross-validation fold: validation rows only
            continue
        lr = s["LR trilinear"]
        models = [m for m in trained.get(deg, []) if m in s]
        if not models:
            continue
        v = (validation or {}).get(deg) or {}
        chooser = v if all(m in v for m in models) else s
        best = min(models, key=lambda m: chooser[m]["fidelity_vs_lr"])
        factor = 0.5 if deg == "hrpqct" else 1.0
        out[deg] = {
            "best": best,
            "best_chosen_on": "validation" if chooser is v else "test",
            "best_fidelity_vs_lr": {
                "validation": v[best]["fidelity_vs_lr"] if best in v else None,
                "test": s[best]["fidelity_vs_lr"],
            },
            "error_vs_lr": {
                p: {
                    "best": s[best][f"{p}_mare"],
                    "lr": lr[f"{p}_mare"],
                    "ok": s[best][f"{p}_mare"] <= factor * lr[f"{p}_mare"],
                }
                for p in FIDELITY
            },  # fmt: skip
            "error_rule": "<= 0.5 x LR" if factor == 0.5 else "< LR",
            "pearson_r_ge_0.95": {
                p: {"r": s[best][f"{p}_r"], "ok": (s[best][f"{p}_r"] or 0) >= 0.95}
                for p in ("bv_tv", "tb_th_mm", "tb_sp_mm")
            },
            "psnr_gain_db": {
                "gain": s[best]["psnr_db"] - lr["psnr_db"],
                "ok": s[best]["psnr_db"] - lr["psnr_db"] >= 2.0,
            },  # fmt: skip
            "morphometry_loss": _with_and_without(s, models, "+morpho"),
            # the GAN stage against the generator it started from (same test VOIs)
            "gan_stage": _with_and_without(s, models, "+gan"),
        }
    return out


MISSED = (
    "a sub-VOI where HR's value is defined and non-zero but a method's is not (it segmented no "
    "bone there) counts as a 100 % error in that method's mean relative error "
    "(bone3d.evaluation.stats.error_pairs; <p>_n_missed); R and ICC use the VOIs where both "
    "are defined"
)


def resummarise(result: dict) -> dict:
    """``result`` (a result file's content) with its summaries and acceptance recomputed from its
    per-sub-VOI rows by this code's `summarise`, `pool_seeds` and `acceptance`: no training or
    inference. For a change in how rows are summarised (not in how volumes are scored); the
    MLflow metrics in the work folder keep the old values."""
    rows = result["rows"]
    per_run = {
        deg: {
            part: summarise([r for r in rows if r["degradation"] == deg and r["split"] == part])
            for part in ("test", "validation")
        }
        for deg in dict.fromkeys(r["degradation"] for r in rows)
    }  # fmt: skip
    trained = {
        deg: list(dict.fromkeys(_label(i) for i in runs.values()))
        for deg, runs in result["trainings"].items()
    }
    out = dict(result)
    out["summary"] = {d: pool_seeds(p["test"]) for d, p in per_run.items()}
    out["validation_summary"] = {d: pool_seeds(p["validation"]) for d, p in per_run.items()}
    if "summary_per_seed" in result:
        out["summary_per_seed"] = {d: p["test"] for d, p in per_run.items()}
    out["acceptance"] = acceptance(out["summary"], trained, out["validation_summary"])
    out["data"] = {**result["data"], "missed_values": MISSED}
    return out


def print_table(deg: str, s: dict[str, dict], split: str = "test") -> None:
    from bone3d.evaluation.report import PARAMS

    short = {"bv_tv": "BV/TV", "tb_th_mm": "Tb.Th", "tb_sp_mm": "Tb.Sp", "tb_n_per_mm": "Tb.N",
             "conn_d_per_mm3": "Conn.D", "da": "DA"}  # fmt: skip
    print(f"\n{deg}: mean absolute relative error vs HR (%) / Pearson R across {split} VOIs")
    head = f"{'method':28s}{'PSNR':>7s}{'SSIM':>7s}" + "".join(f"{short[p]:>14s}" for p in PARAMS)
    print(head + f"{'vs LR':>8s}")
    for m, r in s.items():
        cells = "".join(
            f"{100 * r[f'{p}_mare']:7.1f} / {r[f'{p}_r']:4.2f}"
            if r[f"{p}_r"] is not None
            else f"{100 * r[f'{p}_mare']:7.1f} /  -- "
            for p in PARAMS
        )
        print(f"{m:28s}{r['psnr_db']:7.2f}{r['ssim']:7.3f}{cells}{r['fidelity_vs_lr']:8.2f}")


def machine() -> str:
    """Cores, CPU model and the SIMD level of PyTorch's CPU kernels: seeded trainings repeat to
    the last digit on one machine, not across machines (kernels of another level can round
    differently, and training amplifies that; benchmarks/results/README.md)."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), None)
    return (
        f"{os.cpu_count()} CPU cores ({name or platform.processor() or 'CPU model unknown'}), "
        f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} kernels, no GPU"
    )


def export_best(info: dict, target: Path, ensemble: bool) -> Path:
    """``bone3d export`` of the best run (with the self-ensemble on when it was scored so),
    unpacked into ``target`` (replaced atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        z = Path(tmp) / "best.zip"
        _py(["-m", "bone3d.cli", "export", str(ROOT / "bundles" / info["bundle"]), "--variant",
             info["variant"], "-o", str(z), "--checkpoint", info["checkpoint"],
             *(["--self-ensemble"] if ensemble else [])],
            Path(tmp) / "export.log")  # fmt: skip
        unpacked = Path(tmp) / "bundle"
        with zipfile.ZipFile(z) as zf:
            zf.extractall(unpacked)
        (inner,) = [p for p in unpacked.iterdir() if p.is_dir()] or [unpacked]
        old = target.with_name(target.name + ".old")
        if target.exists():
            target.rename(old)
        shutil.move(str(inner), target)
        shutil.rmtree(old, ignore_errors=True)
    return target


# --- main -----------------------------------------------------------------------------------


SEGMENTATION = {
    "voi": "ImageJ IsoData computed inside each sub-VOI, for each method and HR",
    "volume": "ImageJ IsoData computed once over each volume's scored region, for each method "
    "and HR, applied in every sub-VOI",
}


def _threshold_name(threshold: str | float) -> str:
    """``voi``, ``volume`` or the fixed value without a trailing ``.0`` (file and metric names)."""
    return threshold if isinstance(threshold, str) else f"{threshold:g}"


def _threshold(text: str) -> str | float:
    """``--threshold``: ``voi``, ``volume`` or a finite grey value in mg HA/cm^3."""
    if text in ("voi", "volume"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'voi', 'volume' or a number in mg HA/cm^3, not {text!r}"
        ) from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"a fixed threshold must be finite, not {text!r}")
    return value


def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (argparse prints the message and exits 2)."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--degradations", nargs="+", default=["hrpqct", "mdct"])
    ap.add_argument("--variants", nargs="+", default=["3d", "2p5d"])
    ap.add_argument("--models", nargs="+", default=["unet_sr", "rcan", "pix2pix"])
    ap.add_argument("--loss", nargs="+", default=["plain", "morpho"], choices=["plain", "morpho"])
    ap.add_argument("--epochs-3d", type=int, default=30)
    ap.add_argument("--epochs-2p5d", type=int, default=30)
    ap.add_argument(
        "--patch-3d", type=int, default=32,
        help="side of the 3D training patches in HR voxels (batches of 4; a multiple of 16 for "
        "the U-Net); a trial: needs --out and a --work of its own",
    )  # fmt: skip
    ap.add_argument("--phantoms", type=_count, default=2, help="trabecular phantoms (training)")
    ap.add_argument(
        "--cortical-phantoms", type=_count, default=2,
        help="phantoms with a cortical shell and empty space outside it (training)",
    )  # fmt: skip
    ap.add_argument(
        "--sparse-phantoms", type=_count, default=2,
        help="low-density trabecular phantoms: perforated, BV/TV about 0.03-0.08 (training)",
    )  # fmt: skip
    ap.add_argument("--test", type=int, default=4, help="test donors (single-ROI BoneBox)")
    ap.add_argument(
        "--validation", type=int, default=2,
        help="validation donors (single-ROI BoneBox), which choose the best model",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="data: split and degradation noise")
    ap.add_argument(
        "--train-seeds", nargs="+", type=int, default=[0],
        help="training seeds (the bundles' seed: weight initialisation, patch sampling); the "
        "data stay those of --seed. Several: every model trains once per seed, its scores are "
        "the mean over the seeds with their SD (<score>_sd), written to fidelity_seeds.json "
        "(MLflow metrics fid_seeds_* on each seed's run), and nothing is exported; each model "
        "also gets a row NAME@ensemble, the mean of its seeds' SR volumes (not a candidate "
        "for the best model)",
    )  # fmt: skip
    ap.add_argument("--work", default=str(RESULTS / "work"))
    ap.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument(
        "--self-ensemble", action=argparse.BooleanOptionalAction, default=True,
        help="score every model's mirror self-ensemble (bone3d infer --self-ensemble; the "
        "exported best bundle has it on); --no-self-ensemble: single passes, MLflow metrics "
        "fid_single_pass_*, fidelity_single_pass.json, no export",
    )  # fmt: skip
    ap.add_argument(
        "--purify", action="store_true",
        help="sensitivity protocol: BoneJ Purify on every sub-VOI's bone (HR and every method) "
        f"before morphometry; writes {PURIFIED_OUT.name} unless --out is given, MLflow metrics "
        "fid_purified_*, and exports nothing",
    )  # fmt: skip
    ap.add_argument(
        "--threshold", type=_threshold, default="volume", metavar="{volume,voi,MGHA}",
        help="segmentation (HR and every method): volume (default, the headline) IsoData "
        "computed once over each volume's scored region; voi: IsoData computed inside each "
        "sub-VOI; a number: that fixed grey value in mg HA/cm^3 (Scanco's convention; the "
        "phantom intensity model puts marrow at 0 and bone tissue at 1000). Other than "
        "volume, a sensitivity protocol: writes fidelity_thr_<value>.json unless --out is "
        "given, MLflow metrics fid_thr_<value>_*, and exports nothing",
    )  # fmt: skip
    ap.add_argument(
        "--merge", action="store_true",
        help="keep the degradations of an existing --out file that this run does not redo",
    )  # fmt: skip
    ap.add_argument(
        "--bundle-args", type=shlex.split, default=[], metavar="'ARGS'",
        help="a trial: extra `monai.bundle run` arguments for every training, one quoted "
        "string written with '=' (--bundle-args='--loss#threshold otsu_each'); needs --out "
        "and a work folder of its own, exports nothing",
    )  # fmt: skip
    ap.add_argument(
        "--fold", type=_count, default=0,
        help="cross-validation: 0 (default) the headline split; k > 0 the same test donors "
        "and the next validation donors of the seeded order (the earlier ones train). A fold "
        "k > 0 scores its validation donors only, needs --out and a work folder of its own, "
        "and exports nothing; benchmarks/cross_validation.py pools the folds' validation rows",
    )  # fmt: skip
    ap.add_argument(
        "--test-fold", type=_count, default=0,
        help="outer cross-validation: 0 (default) the headline split; t > 0 tests the t-th "
        "block of --test donors of the seeded order instead (disjoint from the other test "
        "folds; with --test 2, folds 0-4 test each single-ROI donor once), validation the "
        "donors after them. Needs --out and a work folder of its own, exports nothing; "
        "benchmarks/verdict_uncertainty.py FILE... --method NAME pools the folds' test rows",
    )  # fmt: skip
    ap.add_argument(
        "--regressor", type=float, default=0.0, metavar="WEIGHT",
        help="a trial: fit the frozen morphometry regressor (bone3d fit-regressor with its "
        "defaults; 3D, and 2D for 2.5D) on each degradation's training HR volumes into "
        "WORK/<degradation>/regressor_<n>d.pt and add its loss term at WEIGHT to every +morpho "
        "training; needs --out and a work folder of its own, exports nothing",
    )  # fmt: skip
    ap.add_argument(
        "--regressor-level", choices=["otsu", "isodata"], default="otsu",
        help="with --regressor: the regressor's patch labels segmented at each patch's own Otsu "
        "threshold (default) or at one level for every patch, the training HR volumes' pooled "
        "IsoData (bone3d fit-regressor --level)",
    )  # fmt: skip
    ap.add_argument(
        "--gan-stage", nargs="*", default=list(GAN_STAGE_MODELS), metavar="MODEL",
        help="a trial (needs --out and a --work of its own): after the +morpho training of "
        "each of these (pre-upsampling) bundles, fine-tune its generator "
        f"{GAN_STAGE_EPOCHS} epochs more by pix2pix's paired GAN step (gan_stage_args), in "
        "every variant; rows NAME+morpho+gan. With --model-epochs unet_sr-3d=60 --gan-stage "
        "unet_sr: the setting of fidelity_gan_stage_60ep.json",
    )  # fmt: skip
    ap.add_argument(
        "--model-epochs", nargs="*", type=_model_epochs,
        default=[_model_epochs(x) for x in MODEL_EPOCHS],
        metavar="BUNDLE-VARIANT=N",
        help="a trial: epochs of one bundle and variant (its plain and +morpho trainings) in "
        "place of --epochs-3d / --epochs-2p5d",
    )  # fmt: skip
    ap.add_argument(
        "--resummarise", nargs="+", metavar="FILE",
        help="recompute the summaries and acceptance of existing result files from their rows "
        "with this code's rules (each file replaced atomically; nothing trained, inferred or "
        "logged to MLflow), print each file's verdict, and exit",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.resummarise:
        from bone3d.io import write_json

        for name in args.resummarise:
            try:
                result = resummarise(json.loads(Path(name).read_text()))
            except (OSError, ValueError, KeyError) as e:
                print(f"cannot resummarise {name}: {e}", file=sys.stderr)
                return 2
            write_json(result, name)
            print(f"{name}: resummarised")
            print_verdict(result["acceptance"])
        return 0
    for flag, used in (
        ("--bundle-args", args.bundle_args),
        ("--regressor", args.regressor),
        ("--fold", args.fold),
        ("--test-fold", args.test_fold),
        ("--patch-3d", args.patch_3d != 32),
        ("--gan-stage", args.gan_stage != list(GAN_STAGE_MODELS)),
        ("--model-epochs", args.model_epochs != [_model_epochs(x) for x in MODEL_EPOCHS]),
    ):
        if used and args.out == ap.get_default("out"):
            ap.error(f"{flag} is a trial: give --out (and a --work of its own)")
    if args.regressor < 0 or not np.isfinite(args.regressor):
        ap.error(f"--regressor: a weight >= 0, not {args.regressor}")
    if args.regressor_level != "otsu" and not args.regressor:
        ap.error("--regressor-level needs --regressor WEIGHT")
    if args.patch_3d < 16 or args.patch_3d % 16:
        ap.error(f"--patch-3d: a multiple of 16, not {args.patch_3d}")
    try:
        [gan_stage_args(b, "") for b in args.gan_stage]
    except (ValueError, OSError) as e:
        ap.error(str(e))
    if (args.bundle_args or args.regressor or args.fold or args.test_fold or args.patch_3d != 32
            or args.gan_stage != list(GAN_STAGE_MODELS)
            or args.model_epochs != [_model_epochs(x) for x in MODEL_EPOCHS]):  # fmt: skip
        args.no_export = True
    # one protocol, one set of names: MLflow metric prefix, csv, output, baseline-run suffix
    suffix = (
        ("_purified" if args.purify else "")
        + ("" if args.threshold == "volume" else f"_thr_{_threshold_name(args.threshold)}")
        + ("" if args.self_ensemble else "_single_pass")
        + ("_seeds" if len(args.train_seeds) > 1 else "")
    )
    prefix = f"fid{suffix}_"
    if suffix:  # a sensitivity protocol: its own JSON, no export
        args.no_export = True
        if args.out == ap.get_default("out"):
            args.out = str(RESULTS / f"fidelity{suffix}.json")
    if not DATA.is_dir():
        print(f"needs the real micro-CT volumes in {DATA}", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from bone3d.evaluation.report import MIN_BONE, bone_blocks
    from bone3d.io import read_volume, write_csv, write_json

    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    db = work / "mlruns.db"
    epochs = {"3d": args.epochs_3d, "2p5d": args.epochs_2p5d}
    model_epochs: dict[str, dict[str, int]] = {}
    for bundle, variant, n in args.model_epochs:
        model_epochs.setdefault(bundle, {})[variant] = n
    _log("HR volumes")
    volumes = hr_volumes(args.phantoms, args.seed, args.cortical_phantoms, args.sparse_phantoms)
    try:
        split = donor_split(
            volumes, args.test, args.validation, args.seed, args.fold, args.test_fold
        )
    except ValueError as e:
        print(f"--fold / --test-fold: {e}", file=sys.stderr)
        return 2
    _log(f"split: test {split['test']}, validation {split['validation']}, "
         f"{len(split['training'])} training volumes")  # fmt: skip
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    rows, summary, runs, trained, timing, configs = [], {}, {}, {}, {}, {}
    val_summary, per_run, excluded = {}, {}, {}
    prev = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).is_file() else {}
    for deg in prev.get("summary", {}):
        if deg in args.degradations:
            continue
        summary[deg], runs[deg] = prev["summary"][deg], prev["trainings"][deg]
        val_summary[deg] = prev.get("validation_summary", {}).get(deg, {})
        trained[deg] = list(dict.fromkeys(_label(i) for i in runs[deg].values()))
        timing[deg] = prev["elapsed_per_degradation_s"][deg]
        configs[deg] = prev.get("config_per_degradation", {}).get(deg, prev["config"])
        rows += [r for r in prev["rows"] if r["degradation"] == deg]
    for deg in args.degradations:
        t_deg = time.perf_counter()
        datalist = build_dataset(volumes, split, deg, work / deg / "data", args.seed)
        from bone3d.data.datalist import datalist_items

        scored = [] if args.fold else [("test", i) for i in datalist_items(datalist, "test")]
        scored += [("validation", i) for i in datalist_items(datalist, "validation")]
        extra = {variant: list(args.bundle_args) for variant in args.variants}
        if args.regressor and "morpho" in args.loss:  # fitted once per work folder, dims, level
            for variant in args.variants:
                dims = 3 if variant == "3d" else 2
                tag = "" if args.regressor_level == "otsu" else f"_{args.regressor_level}"
                reg = work / deg / f"regressor_{dims}d{tag}.pt"
                if not reg.is_file():
                    _log(f"{deg}: fitting the {dims}D morphometry regressor")
                    _py(["-m", "bone3d.cli", "fit-regressor", "--datalist", str(datalist),
                         "-o", str(reg), "--spatial-dims", str(dims),
                         "--level", args.regressor_level],
                        work / deg / "regressor.log")  # fmt: skip
                extra[variant] += ["--loss#regressor", str(reg),
                                   "--morphometry_loss#regressor", str(args.regressor)]  # fmt: skip
        infos = []
        for seed in args.train_seeds:
            for bundle in args.models:
                for variant in args.variants:
                    for loss in args.loss:
                        name = f"{bundle}-{variant}-{loss}" + (f"-seed{seed}" if seed else "")
                        n_ep = {**epochs, **model_epochs.get(bundle, {})}
                        info = train(bundle, variant, loss == "morpho", datalist,
                                     work / deg / "runs" / name, db, n_ep, seed,
                                     extra[variant] if loss == "morpho" else args.bundle_args,
                                     args.patch_3d)  # fmt: skip
                        _log(f"{deg} {_run_key(info)}: trained in {info['train_s']:.0f} s")
                        infos.append(info)
                        if bundle in args.gan_stage and loss == "morpho":
                            stage = train("pix2pix", variant, True, datalist,
                                          work / deg / "runs" / f"{name}-gan", db,
                                          {variant: GAN_STAGE_EPOCHS}, seed,
                                          extra[variant] + gan_stage_args(bundle, info["checkpoint"]),
                                          args.patch_3d)  # fmt: skip
                            stage["stage_of"] = bundle
                            _log(f"{deg} {_run_key(stage)}: trained in {stage['train_s']:.0f} s")
                            infos.append(stage)
        deg_rows = []
        for part, item in scored:
            lr, hr = read_volume(item["image"]), read_volume(item["target"])
            vols = {
                "LR trilinear": _on_hr(lr, hr, "linear"),
                "LR cubic B-spline": _on_hr(lr, hr, "bspline"),
            }
            # LR in HR units by least squares, as `bone3d evaluate` does (PSNR needs one scale)
            h = hr.data[0].numpy().astype(np.float64)
            for k in list(vols):
                a, b = np.polyfit(vols[k].ravel().astype(np.float64), h.ravel(), 1)
                vols[k] = (a * vols[k] + b).astype(np.float32)
            for info in infos:
                out = sr_folder(work, deg, args.self_ensemble) / _run_key(info)
                out = out / f"{item['specimen']}.nii.gz"
                out.parent.mkdir(parents=True, exist_ok=True)
                infer(info["bundle"], info["variant"], info["checkpoint"], item["image"], out,
                      out.parent / "infer.log", args.self_ensemble)  # fmt: skip
                vols[_run_key(info)] = read_volume(out).data[0].numpy().astype(np.float32)
            vols.update(seed_ensembles(vols))
            scores = score_volume(vols, h.astype(np.float32), purify=args.purify,
                                  threshold=args.threshold)  # fmt: skip
            for r in scores:
                deg_rows.append(
                    {"degradation": deg, "split": part, "specimen": item["specimen"], **r}
                )  # fmt: skip
            cut = h[tuple(slice(0, n) for n in scored_shape(h.shape))]
            empty = bone_blocks(cut, np.ones(cut.shape, bool), 2)[1]
            if empty:
                excluded[item["specimen"]] = empty
            _log(f"{deg} {part} {item['specimen']}: scored {len(vols)} methods"
                 + (f"; sub-VOIs without bone, not scored: {', '.join(empty)}" if empty else ""))  # fmt: skip
        per_run[deg] = {
            part: summarise([r for r in deg_rows if r["split"] == part])
            for part in ("test", "validation")
        }  # fmt: skip
        summary[deg] = pool_seeds(per_run[deg]["test"])
        val_summary[deg] = pool_seeds(per_run[deg]["validation"])
        trained[deg] = list(dict.fromkeys(_label(i) for i in infos))
        runs[deg] = {_run_key(i): i for i in infos}
        rows += deg_rows
        timing[deg] = round(time.perf_counter() - t_deg, 1)
        configs[deg] = {"models": args.models, "variants": args.variants, "loss": args.loss,
                        "epochs": epochs, "model_epochs": model_epochs,
                        "gan_stage_epochs": GAN_STAGE_EPOCHS, "patch_3d": args.patch_3d, "phantoms": args.phantoms,
                        "cortical_phantoms": args.cortical_phantoms,
                        "sparse_phantoms": args.sparse_phantoms, "seed": args.seed,
                        "train_seeds": args.train_seeds,
                        "self_ensemble": args.self_ensemble,
                        "bundle_args": args.bundle_args,
                        "regressor_weight": args.regressor,
                        "regressor_level": args.regressor_level, "gan_stage": args.gan_stage,
                        "fold": args.fold,
                        "test_fold": args.test_fold}  # fmt: skip
        if args.fold:
            print_table(deg, val_summary[deg], "validation")
        else:
            print_table(deg, summary[deg])
        # MLflow: scores on the training runs, baselines as runs of their own
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
        csv_name = f"voi_scores{suffix}.csv"
        csv = write_csv(deg_rows, work / deg / csv_name, list(deg_rows[0]))
        for m in dict.fromkeys([*per_run[deg]["test"], *per_run[deg]["validation"]]):
            s, val = per_run[deg]["test"].get(m, {}), per_run[deg]["validation"].get(m, {})
            if m in runs[deg]:
                found = client.search_runs(
                    [exp_id], f"attributes.run_name = '{runs[deg][m]['run_name']}'"
                )
                if not found:
                    continue
                run_id = found[0].info.run_id
            else:
                run_id = client.create_run(
                    exp_id, run_name=f"{m.replace(' ', '-')}-{deg}{suffix.replace('_', '-')}",
                    tags={"bone3d.kind": "seed_ensemble" if m.endswith(ENSEMBLE) else "baseline"},
                ).info.run_id  # fmt: skip
                client.log_param(run_id, "model", m)
                client.log_param(run_id, "degradation_preset", deg)
                client.log_param(
                    run_id, "split_hash", json.loads(datalist.read_text())["split_hash"]
                )
                client.set_terminated(run_id)
            for k, v in s.items():
                if v is not None:
                    client.log_metric(run_id, f"{prefix}{k}", float(v))
            for k, v in val.items():
                if v is not None:
                    client.log_metric(run_id, f"{prefix}val_{k}", float(v))
            client.log_artifact(run_id, str(csv), artifact_path="fidelity")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "elapsed_per_degradation_s": timing,
        "elapsed_note": "elapsed_s is this invocation; with --merge, kept degradations keep "
        "their own timings; trainings reused from the work folder (reused: true) count only "
        "their scoring here, and training_s_per_degradation sums every training's own time",
        "training_s_per_degradation": {
            d: round(sum(i["train_s"] for i in r.values()), 1) for d, r in runs.items()
        },
        "config_per_degradation": configs,
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "data": {
            "hr_spacing_mm": HR_MM,
            "hr_shape": [SIZE] * 3,
            "hr_window": list(HR_RANGE),
            "volumes": [{k: v[k] for k in ("id", "donor", "source")} for v in volumes],
            "split": split,
            "fold": args.fold,
            "test_fold": args.test_fold,
            "sub_vois_per_volume": 8,
            "sub_vois_without_bone": {
                "rule": f"left out for every method when under {MIN_BONE:.0%} of the sub-VOI "
                "is bone in HR segmented by its IsoData threshold over the scored region "
                "(bone3d.evaluation.report.bone_blocks)",
                "left_out": excluded,
            },
            "scored_region": f"first (n // {SCORE_MULTIPLE}) * {SCORE_MULTIPLE} HR voxels per axis, "
            "the same for every method",
            "segmentation": SEGMENTATION.get(
                args.threshold,
                f"a fixed threshold of {_threshold_name(args.threshold)} mg "
                "HA/cm^3 for every method and HR (Scanco's convention)",
            )
            + ("; then BoneJ Purify of each sub-VOI's bone" if args.purify else ""),
            "missed_values": MISSED,
            "inference": "bone3d infer"
            + (" --self-ensemble (mean over the mirrored inputs)" if args.self_ensemble else ""),
        },  # fmt: skip
        "trainings": runs,
        "summary": summary,
        "validation_summary": val_summary,
        **(
            {"summary_per_seed": {d: r["test"] for d, r in per_run.items()}}
            if len(args.train_seeds) > 1
            else {}
        ),  # fmt: skip
        "acceptance": acceptance(summary, trained, val_summary),
        "rows": rows,
        "mlflow": {"tracking_uri": f"sqlite:///{db}", "experiment": EXPERIMENT},
    }
    best = result["acceptance"].get("hrpqct", {}).get("best")
    if "hrpqct" not in args.degradations and prev.get("best_bundle"):
        result["best_bundle"] = prev["best_bundle"]  # hrpqct kept from the earlier run
    elif best and not args.no_export:
        info = next(i for i in runs["hrpqct"].values() if _label(i) == best)  # the first seed's
        target = export_best(info, RESULTS / "best_bundle", args.self_ensemble)
        result["best_bundle"] = {"model": best, "path": str(target.relative_to(ROOT))}
        _log(f"best model {best} exported to {target}")
    write_json(result, args.out)
    print(f"\nwrote {args.out}; {result['elapsed_s'] / 60:.1f} min in all")
    print_verdict(result["acceptance"])
    return 0


def print_verdict(acceptance: dict) -> None:
    """One line per degradation: the chosen model and each target met or not."""
    for deg, acc in acceptance.items():
        print(f"{deg}: best {acc['best']} (chosen on {acc['best_chosen_on']}); " + ", ".join(
            f"{p} {'ok' if v['ok'] else 'NOT met'}" for p, v in acc["error_vs_lr"].items()
        ) + f" ({acc['error_rule']}); R>=0.95: " + ", ".join(
            f"{p} {'ok' if v['ok'] else 'NOT met'}" for p, v in acc["pearson_r_ge_0.95"].items()
        ) + f"; PSNR +{acc['psnr_gain_db']['gain']:.2f} dB")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
