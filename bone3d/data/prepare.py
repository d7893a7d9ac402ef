"""Make a training dataset: registered LR/HR pairs on disk plus ``datalist.json``.

Sources (one of):

* ``phantoms=N``: N synthetic specimens (`bone3d.data.phantom`) with architecture drawn per
  specimen (BV/TV 0.08-0.30, rod fraction 0.2-0.8, anisotropy 1.0-1.6), degraded with a preset;
  with ``cortical=K`` the last K of them inside a porous cortical shell with bone-free space
  around it (see `prepare`);
* ``hr_dir``: a folder of HR volumes, one specimen each, degraded with a preset (intensities are
  mapped to HU from each volume's two-class means: marrow below / bone above the IsoData level);
* ``pairs``: a CSV with columns ``specimen,lr,hr`` of LR/HR volumes. Without ``register`` they
  must already be on one field of view (the HR grid starts where the LR grid starts); with
  ``register=True`` each pair is registered first (`bone3d.registration.pairing.register_pair`,
  what ``bone3d register --pairs`` runs) and pairs flagged by the registration QA are left out,
  with the reason in the log and in the datalist's ``registration.flagged``.

Each specimen gets a folder with ``lr.nii.gz`` (LR, HU), ``hr.nii.gz`` (HR cropped to the LR
field of view), for phantoms ``truth.nii.gz`` (binary bone truth), and ``degradation.json``
(what the degradation model did).
"""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bone3d.data.datalist import split_by_specimen, write_datalist
from bone3d.data.phantom import CORTEX_SEMI_AXES, PhantomSpec, make_phantom
from bone3d.data.simulate import crop_to_lr_field, degrade, get_preset
from bone3d.errors import InputError
from bone3d.io import read_volume, write_json, write_volume
from bone3d.morphometry.thresholds import threshold_value


def two_class_means(array: np.ndarray) -> tuple[float, float]:
    """Mean grey value below and above ImageJ's IsoData threshold (marrow, bone)."""
    t = threshold_value(array, "isodata")
    return float(array[array <= t].mean()), float(array[array > t].mean())


def _window(lo: float, hi: float) -> list[float]:
    """Intensity window [marrow - 20 % contrast, bone + 20 % contrast]."""
    c = hi - lo
    return [lo - 0.2 * c, hi + 0.2 * c]


def prepare(
    out_dir: str | os.PathLike,
    *,
    phantoms: int = 0,
    hr_dir: str | os.PathLike | None = None,
    pairs: str | os.PathLike | None = None,
    preset: str = "hrpqct",
    n_val: int = 1,
    n_test: int = 1,
    seed: int = 0,
    phantom_shape: tuple[int, int, int] = (96, 96, 96),
    phantom_spacing_mm: float = 0.05,
    hr_spacing: tuple[float, float, float] | None = None,
    misalign: bool = False,
    name: str | None = None,
    progress: bool = True,
    register: bool = False,
    register_options: dict | None = None,
    psf_jitter: float = 0.0,
    cortical: int = 0,
) -> Path:
    """Build the dataset under ``out_dir`` and return the path of its ``datalist.json``.

    ``cortical`` (phantoms only): the last ``cortical`` phantoms get a porous cortical shell
    (`PhantomSpec` ``cortex=True``: an elliptic cylinder along z with semi-axes 0.45 and 0.40 of
    the box, `bone3d.data.phantom.CORTEX_SEMI_AXES`; cortical thickness 0.3-0.6 mm, at most a
    third of the shorter semi-axis, and 5-29 closed pores, drawn per specimen). About 43 % of the
    box then lies outside the bone, as in an ROI at the edge of a vertebral body. A model trained
    only on boxes full of trabeculae draws trabecula-like specks into the noise of such space
    (what the fidelity benchmark found on a validation donor with empty space;
    `benchmarks/fidelity.py`). The other phantoms are the same as without ``cortical`` (their
    draws are unchanged).

    ``psf_jitter`` (simulated pairs): each specimen's PSF FWHM is the preset's times a factor
    drawn uniformly in ``[1 - j, 1 + j]`` per axis (seeded by specimen), so the blur varies over
    the dataset, as blind SR (DAN's kernel estimator) needs; ``degradation.json`` records each.
    """
    sources = [bool(phantoms), hr_dir is not None, pairs is not None]
    if sum(sources) != 1:
        raise InputError("prepare", "give exactly one source: phantoms=N, hr_dir or pairs")
    if not 0.0 <= float(psf_jitter) < 1.0:
        raise InputError("psf_jitter", f"must be in [0, 1), got {psf_jitter}")
    if psf_jitter and pairs is not None:
        raise InputError("psf_jitter", "applies to simulated pairs, not to --pairs")
    if cortical and not phantoms:
        raise InputError("cortical", "applies to phantoms only")
    if not 0 <= int(cortical) <= int(phantoms or 0):
        raise InputError("cortical", f"must be in [0, phantoms={phantoms}], got {cortical}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items: list[dict] = []
    p = get_preset(preset)
    meta: dict = {"preset": preset, "misaligned": bool(misalign)}
    if psf_jitter:
        meta["psf_jitter"] = float(psf_jitter)

    def scanner(i: int):
        """The preset, with specimen ``i``'s PSF when ``psf_jitter`` is set."""
        if not psf_jitter:
            return p
        f = np.random.default_rng([seed, i, 17]).uniform(1 - psf_jitter, 1 + psf_jitter, 3)
        fwhm = np.asarray(p.psf_fwhm_mm, dtype=float) * f
        return replace(p, psf_fwhm_mm=tuple(float(v) for v in fwhm))

    if phantoms:
        rng = np.random.default_rng(seed)
        ids = [f"phantom{i:03d}" for i in range(int(phantoms))]
        split_by_specimen(ids, n_val, n_test, seed)  # refuse an impossible split before any work
        for i, sid in enumerate(tqdm(ids, desc="phantoms", disable=None if progress else True)):
            spec = PhantomSpec(
                shape=tuple(phantom_shape),
                spacing_mm=phantom_spacing_mm,
                bv_tv=float(rng.uniform(0.08, 0.30)),
                rod_fraction=float(rng.uniform(0.2, 0.8)),
                anisotropy=float(rng.uniform(1.0, 1.6)),
                seed=seed * 1000 + i,
            )
            if i >= int(phantoms) - int(cortical):
                spec = _with_cortex(spec, np.random.default_rng([seed, i, 23]))
            ph = make_phantom(spec)
            d = degrade(ph.image, scanner(i), seed=seed * 1000 + i, misalign=misalign)
            items.append(write_specimen(out / sid, sid, ph.image, d, truth=ph.truth, spec=spec))
        hr_win = [-200.0, 1200.0]
        meta.update(hr_units="mg HA/cm^3", hr_range=hr_win)
        meta["lr_range"] = [p.hu_slope * v + p.hu_intercept for v in hr_win]
        meta["hr_spacing_mm"] = [phantom_spacing_mm] * 3
        meta["name"] = name or f"phantoms{phantoms}-{preset}-s{seed}" + (
            f"-cortical{cortical}" if cortical else ""
        )
        if cortical:
            meta["cortical_phantoms"] = int(cortical)
    elif hr_dir is not None:
        if not Path(hr_dir).is_dir():
            raise InputError(hr_dir, "not a folder of HR volumes")
        files = sorted(
            f for f in Path(hr_dir).iterdir() if f.is_file() and not f.name.startswith(".")
        )
        files = [
            f for f in files if f.suffix.lower() not in (".png", ".md", ".csv", ".npy", ".json")
        ]
        if not files:
            raise InputError(hr_dir, "no HR volumes found")
        split_by_specimen([f.name.split(".")[0] for f in files], n_val, n_test, seed)
        windows, spacings = [], []
        for i, f in enumerate(tqdm(files, desc="hr volumes", disable=None if progress else True)):
            sid = f.name.split(".")[0]
            hr = read_volume(f, spacing=hr_spacing)
            lo, hi = two_class_means(hr.data[0].numpy().astype(np.float32))
            d = degrade(
                hr, scanner(i), seed=seed * 1000 + i, misalign=misalign, intensity_map=(lo, hi)
            )
            items.append(write_specimen(out / sid, sid, hr, d))
            windows.append(_window(lo, hi))
            spacings.append([float(s) for s in hr.spacing])
        if not np.allclose(spacings, spacings[0], rtol=1e-3):
            raise InputError(
                hr_dir, f"HR volumes differ in spacing: {sorted(set(map(tuple, spacings)))}"
            )
        w = np.mean(windows, axis=0).tolist()
        meta.update(hr_units="input units", hr_range=w, lr_range=_window(0.0, 1400.0))
        meta["hr_spacing_mm"] = spacings[0]
        meta["name"] = name or f"{Path(hr_dir).name}-{preset}-s{seed}"
    else:
        items, meta2 = _pairs(Path(pairs), out, progress, register, register_options or {})
        meta.update(meta2)
        meta["name"] = name or f"{Path(pairs).stem}-pairs"
        meta["preset"] = None

    split = split_by_specimen([it["specimen"] for it in items], n_val, n_test, seed)
    return write_datalist(out / "datalist.json", items, split, split_seed=seed, **meta)


def _with_cortex(spec: PhantomSpec, rng: np.random.Generator) -> PhantomSpec:
    """``spec`` with a porous cortical shell; its own ``rng``, so that the trabecular draws of
    every phantom stay what they are without a cortex."""
    nx, ny, _ = spec.shape
    # the shell's inner semi-axes are its outer ones (`bone3d.data.phantom`) minus Ct.Th: keep
    # two thirds of them for the trabeculae inside
    room = min(CORTEX_SEMI_AXES[0] * nx, CORTEX_SEMI_AXES[1] * ny) * spec.spacing_mm / 3
    ct_th = min(float(rng.uniform(0.3, 0.6)), room)
    return replace(spec, cortex=True, ct_th_mm=ct_th, n_pores=int(rng.integers(5, 30)))


def write_specimen(folder: Path, sid: str, hr, degraded, *, truth=None, spec=None) -> dict:
    """Write one LR/HR pair (HR cut to the LR field of view) and its ``degradation.json`` into
    ``folder``; returns the datalist entry."""
    folder.mkdir(parents=True, exist_ok=True)
    lr = degraded.image
    item = {"specimen": sid}
    item["image"] = str(write_volume(lr, folder / "lr.nii.gz"))
    if degraded.rigid is None:
        item["target"] = str(write_volume(crop_to_lr_field(hr, lr), folder / "hr.nii.gz"))
        if truth is not None:
            item["truth"] = str(write_volume(crop_to_lr_field(truth, lr), folder / "truth.nii.gz"))
    else:  # misaligned: the pair must be registered before training
        item["target"] = str(write_volume(hr, folder / "hr.nii.gz"))
        if truth is not None:
            item["truth"] = str(write_volume(truth, folder / "truth.nii.gz"))
    record = degraded.record()
    if spec is not None:
        record["phantom"] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(spec).items()
        }
    write_json(record, folder / "degradation.json")
    return item


def _pairs(csv_path: Path, out: Path, progress: bool, register: bool, options: dict):
    if not csv_path.is_file():
        raise InputError(csv_path, "pairs CSV not found")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"specimen", "lr", "hr"} <= set(rows[0]):
        raise InputError(csv_path, "expected columns specimen,lr,hr")
    items, lr_w, hr_w, spacings, flagged, records = [], [], [], [], {}, {}
    for row in tqdm(rows, desc="pairs", disable=None if progress else True):
        lr_path = (csv_path.parent / row["lr"]).resolve()
        hr_path = (csv_path.parent / row["hr"]).resolve()
        lr, hr = read_volume(lr_path), read_volume(hr_path)
        if register:
            from bone3d.registration.pairing import register_pair

            rec = register_pair(hr, lr, out / row["specimen"], name=row["specimen"], **options)
            records[row["specimen"]] = str(out / row["specimen"] / "qa.json")
            if not rec["accepted"]:
                flagged[row["specimen"]] = rec["reasons"]
                continue
            lr, hr_c = read_volume(rec["files"]["lr"]), read_volume(rec["files"]["hr"])
            items.append(
                {
                    "specimen": row["specimen"],
                    "image": rec["files"]["lr"],
                    "target": rec["files"]["hr"],
                }
            )
            lr_w.append(_window(*two_class_means(lr.data[0].numpy().astype(np.float32))))
            hr_w.append(_window(*two_class_means(hr_c.data[0].numpy().astype(np.float32))))
            spacings.append([float(s) for s in hr.spacing])
            continue
        try:
            hr_c = crop_to_lr_field(hr, lr)
        except InputError as err:
            raise InputError(hr_path, f"does not match LR {lr_path.name}: {err.reason}") from None
        folder = out / row["specimen"]
        folder.mkdir(parents=True, exist_ok=True)
        items.append(
            {
                "specimen": row["specimen"],
                "image": str(lr_path),
                "target": str(write_volume(hr_c, folder / "hr.nii.gz")),
            }
        )
        lr_w.append(_window(*two_class_means(lr.data[0].numpy().astype(np.float32))))
        hr_w.append(_window(*two_class_means(hr_c.data[0].numpy().astype(np.float32))))
        spacings.append([float(s) for s in hr.spacing])
    if not items:
        raise InputError(csv_path, f"no pair passed registration QA: {flagged}")
    meta = {
        "lr_range": np.mean(lr_w, axis=0).tolist(),
        "hr_range": np.mean(hr_w, axis=0).tolist(),
        "hr_spacing_mm": spacings[0],
        "hr_units": "input units",
    }
    if register:
        meta["registration"] = {"options": options, "qa": records, "flagged": flagged}
    return items, meta
