"""The morphometry panel: every metric in physical units, in one JSON-ready dict.

Nomenclature after Bouxsein et al. 2010 (J Bone Miner Res 25:1468) and Parfitt et al. 1987.
Definitions and conventions live with each metric:

* BV/TV, BV, TV: voxel counting inside the VOI (`bone_volume_fraction`).
* Tb.Th, Tb.Sp: BoneJ local thickness (`bone3d.morphometry.thickness`), mean/SD/max in mm.
* Tb.N: ``plate`` = (BV/TV) / Tb.Th, the parallel-plate model used by CTAn (Parfitt 1983);
  ``direct`` = 1 / (mean distance between the mid-axes of the trabeculae), the Scanco definition
  (Hildebrand et al. 1999, J Bone Miner Res 14:1167): the local thickness of the space between
  the bone's mid-axes (the one-voxel-thin distance ridge), inverted. ``tb_n_method`` says
  which.
* Connectivity: `bone3d.morphometry.connectivity` (chi, delta chi, Conn.D in mm^-3, particles,
  cavities).
* DA: `bone3d.morphometry.anisotropy` (MIL fabric tensor; BoneJ's DA and Scanco's ratio).
* SMI: `bone3d.morphometry.smi`.
* Ct.Th, Ct.Po: `bone3d.morphometry.cortical`.
* BA/TA: bone area over VOI area per slice normal to z, averaged over the slices with VOI
  (the murine micro-CT study's 2D metric), with its SD over slices.

Nulls: a metric that is not requested, or undefined for the input (Tb.Sp of an all-bone VOI,
DA without intercepts, ...) is ``None``, and ``notes`` says why.
"""

from __future__ import annotations

import numpy as np

from bone3d.errors import InputError

TRABECULAR = ("bv_tv", "tb_th", "tb_sp", "tb_n", "connectivity", "da", "smi", "ba_ta")
ALL_METRICS = (*TRABECULAR, "cortical")
FIELDS = (
    "bv_tv", "bv_mm3", "tv_mm3", "tb_th_mm", "tb_th_sd_mm", "tb_th_max_mm", "tb_sp_mm",
    "tb_sp_sd_mm", "tb_sp_max_mm", "tb_n_per_mm", "tb_n_method", "euler", "delta_chi",
    "connectivity", "conn_d_per_mm3", "particles", "cavities", "da", "da_ratio",
    "fabric_eigenvalues", "smi", "ct_th_mm", "ct_po", "ct_po_closed", "ct_po_open", "pore_count",
    "ba_ta",
)  # fmt: skip


def bone_volume_fraction(bone, *, voi=None, spacing=(1.0, 1.0, 1.0)) -> dict:
    """BV/TV by voxel counting (Bouxsein et al. 2010): bone voxels / VOI voxels.

    Args:
        bone: binary bone mask, any shape.
        voi: binary volume of interest of the same shape (whole image when None).
        spacing: voxel size in mm, for BV and TV in mm^3.

    Returns:
        ``{"bv_tv", "bv_mm3", "tv_mm3"}``.
    """
    bone = np.asarray(bone, dtype=bool)
    voi = np.ones_like(bone) if voi is None else np.asarray(voi, dtype=bool)
    if voi.shape != bone.shape:
        raise InputError("voi", f"VOI shape {voi.shape} differs from image shape {bone.shape}")
    n_tv = int(voi.sum())
    if n_tv == 0:
        raise InputError("voi", "empty volume of interest")
    n_bv = int((bone & voi).sum())
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=float)))
    return {"bv_tv": n_bv / n_tv, "bv_mm3": n_bv * voxel_mm3, "tv_mm3": n_tv * voxel_mm3}


def area_fraction(bone, voi=None) -> dict:
    """BA/TA per slice normal to the last axis (2D input = one slice): mean, SD, per slice."""
    b = np.asarray(bone, dtype=bool)
    if b.ndim == 2:
        b = b[:, :, None]
    v = np.ones_like(b) if voi is None else np.asarray(voi, dtype=bool).reshape(b.shape)
    ta = v.sum(axis=(0, 1))
    ba = (b & v).sum(axis=(0, 1))
    ok = ta > 0
    if not ok.any():
        raise InputError("voi", "empty volume of interest")
    per = ba[ok] / ta[ok]
    return {"ba_ta": float(per.mean()), "ba_ta_sd": float(per.std()), "ba_ta_slices": per.tolist()}


def _crop(*arrays, box):
    return [a[box] for a in arrays]


def _bbox(voi: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask (axis projections: no per-voxel index array)."""
    out = []
    for axis in range(voi.ndim):
        other = tuple(j for j in range(voi.ndim) if j != axis)
        hit = np.flatnonzero(voi.any(axis=other))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def direct_tb_n(bone: np.ndarray, voi: np.ndarray, spacing) -> float | None:
    """Scanco's direct Tb.N (1/mm): 1 / mean local thickness of the space between the mid-axes
    (`bone3d.morphometry.thickness.mid_axes`, the thinned distance ridge of the bone)."""
    from bone3d.morphometry.thickness import local_thickness_map, mid_axes, thickness_stats

    skel = mid_axes(bone & voi)
    if not skel.any():
        return None
    space = voi & ~skel
    stats = thickness_stats(local_thickness_map(space, spacing), space)
    return None if not stats["mean"] else 1.0 / stats["mean"]


def morphometry(
    bone: np.ndarray,
    spacing,
    *,
    voi: np.ndarray | None = None,
    metrics=TRABECULAR,
    tb_n_method: str = "plate",
    cortex: np.ndarray | None = None,
    da_directions: int = 256,
    seed: int = 0,
    progress=None,
) -> dict:
    """The morphometry panel of a binary ``bone`` volume.

    Args:
        bone: 3D boolean array (X, Y, Z).
        spacing: voxel size in mm (X, Y, Z). Thickness-type metrics need isotropic voxels.
        voi: boolean VOI (whole image when None).
        metrics: names from `ALL_METRICS`.
        tb_n_method: "plate" (CTAn) or "direct" (Scanco).
        cortex: cortical compartment mask for "cortical" (automatic separation when None).
        progress: optional callable(step_name) for progress display.

    Returns:
        dict with every key of `FIELDS` (None where not computed), ``notes`` and
        ``spacing_mm``.
    """
    from bone3d.morphometry import anisotropy, connectivity, cortical, smi, thickness

    b = np.asarray(bone, dtype=bool)
    if b.ndim != 3:
        raise InputError("bone", f"expected a 3D volume, got {b.ndim}D")
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise InputError("metrics", f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    if tb_n_method not in ("plate", "direct"):
        raise InputError("tb_n_method", f"use 'plate' or 'direct', got {tb_n_method!r}")
    sp = np.asarray(spacing, dtype=float)
    v = np.ones_like(b) if voi is None else np.asarray(voi, dtype=bool)
    if v.shape != b.shape:
        raise InputError("voi", f"VOI shape {v.shape} differs from image shape {b.shape}")
    if not v.any():
        raise InputError("voi", "empty volume of interest")
    out: dict = dict.fromkeys(FIELDS)
    out["notes"] = []
    out["spacing_mm"] = [float(s) for s in sp]
    tick = progress or (lambda name: None)

    box = _bbox(v)
    bc, vc = _crop(b, v, box=box)
    bone_in = bc & vc
    marrow_in = vc & ~bc
    # thickness-type metrics: crop with a 1-voxel margin inside the image, so that a VOI edge
    # inside the image is a boundary while the image border is not (BoneJ's convention)
    mbox = tuple(
        slice(max(0, sl.start - 1), min(n, sl.stop + 1)) for sl, n in zip(box, b.shape, strict=True)
    )
    bm, vm = _crop(b, v, box=mbox)
    out.update(bone_volume_fraction(bc, voi=vc, spacing=sp))
    if not bone_in.any():
        out["notes"].append("no bone in the VOI: bone metrics are null")
    if not marrow_in.any():
        out["notes"].append("no marrow in the VOI: Tb.Sp, DA and SMI-type metrics are null")

    isotropic = bool(np.allclose(sp, sp[0], rtol=1e-3))
    if not isotropic and {"tb_th", "tb_sp", "tb_n", "cortical"} & set(metrics):
        out["notes"].append(
            f"anisotropic voxels {tuple(sp.tolist())}: local thickness (Tb.Th, Tb.Sp, Tb.N, Ct.Th) "
            "needs isotropic voxels and is null; resample first"
        )

    def _thick(fg, name):
        try:
            st = thickness.thickness_stats(thickness.local_thickness_map(fg, sp), fg)
        except InputError as err:
            out["notes"].append(f"{name}: {err.reason}; null")
            return {"mean": None, "sd": None, "max": None}
        return st

    if {"tb_th", "tb_n"} & set(metrics) and isotropic and bone_in.any():
        tick("Tb.Th")
        st = _thick(bm & vm, "Tb.Th")
        out.update(tb_th_mm=st["mean"], tb_th_sd_mm=st["sd"], tb_th_max_mm=st["max"])
    if "tb_sp" in metrics and isotropic and marrow_in.any():
        tick("Tb.Sp")
        st = _thick(vm & ~bm, "Tb.Sp")
        out.update(tb_sp_mm=st["mean"], tb_sp_sd_mm=st["sd"], tb_sp_max_mm=st["max"])
    if "tb_n" in metrics and isotropic and bone_in.any():
        tick("Tb.N")
        if tb_n_method == "plate":
            if out["tb_th_mm"]:
                out["tb_n_per_mm"] = out["bv_tv"] / out["tb_th_mm"]
        else:
            out["tb_n_per_mm"] = direct_tb_n(bm, vm, sp)
        out["tb_n_method"] = (
            "plate: (BV/TV)/Tb.Th (CTAn)"
            if tb_n_method == "plate"
            else "direct: 1/mean mid-axis distance (Scanco)"
        )
    if "connectivity" in metrics:
        tick("Conn.D")
        conn = connectivity.connectivity(bone_in, sp, total_volume_mm3=out["tv_mm3"])
        out.update(conn)
        if voi is not None and not vc.all():
            out["notes"].append("delta chi edge correction uses the VOI's bounding box faces")
    if "da" in metrics and bone_in.any() and marrow_in.any():
        tick("DA")
        fab = anisotropy.fabric_tensor(bc, sp, vc, n_directions=da_directions, seed=seed)
        if fab is None:
            out["notes"].append("DA: some directions had no intercept; DA is null")
        else:
            out.update(
                da=fab["da"], da_ratio=fab["da_ratio"], fabric_eigenvalues=fab["fabric_eigenvalues"]
            )
            out["fabric"] = {
                k: fab[k] for k in ("fabric_radii_mm", "fabric_axes", "n_directions", "seed")
            }
    if "smi" in metrics and bone_in.any():
        tick("SMI")
        out["smi"] = smi.structure_model_index(bone_in, sp)
        if out["smi"] is None:
            out["notes"].append("SMI: structures about one voxel thin have no surface mesh; null")
        if out["bv_tv"] > 0.35:
            out["notes"].append("SMI at BV/TV > 0.35 is dominated by concave surfaces (can be < 0)")
    if "ba_ta" in metrics:
        tick("BA/TA")
        af = area_fraction(bc, vc)
        out["ba_ta"] = af["ba_ta"]
        out["ba_ta_sd"] = af["ba_ta_sd"]
    if "cortical" in metrics and isotropic:
        tick("Ct.Th/Ct.Po")
        cmask = cortex if cortex is not None else cortical.cortical_mask(b & v, sp)
        cmask = np.asarray(cmask, bool)
        if cmask.shape != b.shape:
            raise InputError("cortex", f"cortical mask shape {cmask.shape} differs from {b.shape}")
        out.update(cortical.cortical_metrics(b, cmask & v, sp))
        out["cortex"] = (
            "given mask" if cortex is not None else "automatic (periosteal envelope depth)"
        )
    return out
