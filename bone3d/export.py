"""``bone3d export``: a trained bundle as a zip that runs in plain MONAI, without bone3d.

The in-repository bundles build their networks through ``bone3d.nets.build`` and read data with
bone3d's TorchIO pipeline. The exported bundle instead:

* copies the network's source file and the bone3d network modules it imports into
  ``scripts/`` (imports rewritten to relative ones), and points ``network_def#_target_`` at
  ``scripts.<module>.<Class>`` with the preset's constructor arguments written out;
* has an ``inference.json`` made only of MONAI parts: ``LoadImaged`` -> ``EnsureChannelFirstd`` ->
  ``Spacingd`` to the HR spacing (the LR scan pre-upsampled, bilinear) -> ``ScaleIntensityRanged``
  with the training's LR window -> ``SlidingWindowInferer`` (Gaussian blending; for the 2D and
  2.5D variants bone3d's slab inferer, also copied into ``scripts/``) -> the HR window mapped back
  -> ``SaveImaged``. The windows and spacing come from the training's ``data_meta.json``;
* carries ``models/model.pt`` (a plain state dict of what the exported network holds: a
  network class's ``EXPORT_ARGS`` may build an inference-only form, as FUNIT's averaged
  generator without the trained one), ``models/model.ts`` (its TorchScript form, MONAI's
  ``ckpt_export`` run in the exported folder), ``metadata.json``, ``logging.conf``,
  ``docs/README.md`` and ``LICENSE``.

MONAI adds the bundle root to ``sys.path`` before ``run``, so ``scripts`` imports when the bundle
is run with ``python -m monai.bundle run --config_file <bundle>/configs/inference.json``.
Only inference is exported: training needs bone3d's data pipeline.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from bone3d.errors import InputError
from bone3d.io import atomic_path

_NET_IMPORT = re.compile(r"^from bone3d\.nets\.(\w+) import", re.MULTILINE)


def _module_closure(module: str) -> list[str]:
    """``bone3d.nets`` module names the given one needs (itself included), by their imports."""
    import bone3d.nets as nets

    folder = Path(nets.__file__).parent
    todo, seen = [module], []
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        src = (folder / f"{m}.py").read_text()
        todo += _NET_IMPORT.findall(src)
        if "from bone3d" in _NET_IMPORT.sub("", src):
            raise InputError(
                f"bone3d.nets.{m}", "imports bone3d outside bone3d.nets; cannot export"
            )
    return seen


_GRID = '''"""The affine of a prediction on a grid ``scale`` times finer than its input's (same corner).

MONAI's sliding-window inference up-samples the values of a post-upsampling network but keeps the
input's affine; this sets the finer grid's, as bone3d's ``VolumePredictor`` does.
"""

import torch


def upsampled_grid(scale: int):
    def fix(t):
        a = torch.as_tensor(t.affine, dtype=torch.float64).clone()
        sp = torch.linalg.norm(a[:3, :3], dim=0)
        direction = a[:3, :3] / sp
        fine = sp / scale
        a[:3, 3] = a[:3, 3] - direction @ (fine * (scale - 1) / 2.0)
        a[:3, :3] = direction * fine
        t.affine = a
        return t

    return fix
'''


def _copy_scripts(dest: Path, modules: list[str], slab: bool) -> None:
    import bone3d.inference as inference
    import bone3d.nets as nets

    dest.mkdir(parents=True)
    (dest / "__init__.py").write_text('"""Network code copied from bone3d by bone3d export."""\n')
    for m in modules:
        src = (Path(nets.__file__).parent / f"{m}.py").read_text()
        (dest / f"{m}.py").write_text(_NET_IMPORT.sub(r"from .\1 import", src))
    (dest / "grid.py").write_text(_GRID)
    if slab:
        src = (Path(inference.__file__).parent / "slab.py").read_text()
        if "from bone3d" in src:
            raise InputError("bone3d.inference.slab", "imports bone3d; cannot export")
        (dest / "slab.py").write_text(src)
    src = (Path(inference.__file__).parent / "ensemble.py").read_text()
    if "from bone3d" in src:
        raise InputError("bone3d.inference.ensemble", "imports bone3d; cannot export")
    (dest / "ensemble.py").write_text(src)


def _json_value(v):
    """Constructor arguments as JSON (tuples become lists)."""
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


def inference_config(
    target: str, args: dict, meta: dict, patch, sw_batch, overlap, slab, scale=None,
    self_ensemble: bool = False,
) -> dict:  # fmt: skip
    """The exported ``inference.json``: MONAI components only (see the module docstring).

    ``self_ensemble``: the evaluator runs ``scripts.ensemble.FlipEnsemble`` around the network
    (`bone3d.inference.ensemble`); ``--self_ensemble false|true`` switches it at run time.

    ``scale`` (post-upsampling models): the LR goes onto ``scale x`` the HR spacing, the windows
    are ``patch // scale`` LR voxels, and the prediction's affine is set to the HR grid
    (``scripts/grid.py``: MONAI's sliding window keeps the input affine on zoomed outputs).
    """
    s = int(scale) if scale else 1
    roi = [int(p) // s for p in patch]
    lr0, lr1 = (float(x) for x in meta["lr_range"])
    hr0, hr1 = (float(x) for x in meta["hr_range"])
    if slab is None:
        inferer = {
            "_target_": "SlidingWindowInferer",
            "roi_size": roi,
            "sw_batch_size": sw_batch,
            "overlap": overlap,
            "mode": "gaussian",
        }
    else:
        inferer = {
            "_target_": "scripts.slab.SlabInferer",
            "roi_size": roi,
            "slab": slab,
            "sw_batch_size": sw_batch,
            "overlap": overlap,
        }
    return {
        "imports": ["$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_image": "lr.nii.gz",
        "output_dir": "$@bundle_root + '/eval'",
        "hr_spacing_mm": [float(v) for v in meta["hr_spacing_mm"]],
        "scale": s,
        "lr_range": [lr0, lr1],
        "hr_range": [hr0, hr1],
        "network_def": {"_target_": target, **_json_value(args)},
        "network": "$@network_def.to(@device)",
        "self_ensemble": bool(self_ensemble),
        "ensemble": {"_target_": "scripts.ensemble.FlipEnsemble", "network": "@network"},
        "predict_network": "$@ensemble if @self_ensemble else @network",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": "$[v * @scale for v in @hr_spacing_mm]",
                    "mode": "bilinear",
                    "scale_extent": True,
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": "$@lr_range[0]",
                    "a_max": "$@lr_range[1]",
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": False,
                },
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': @input_image}]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                *(
                    [
                        {
                            "_target_": "Lambdad",
                            "keys": "pred",
                            "func": {"_target_": "scripts.grid.upsampled_grid", "scale": "@scale"},
                        }
                    ]
                    if s > 1
                    else []
                ),
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "pred",
                    "a_min": 0.0,
                    "a_max": 1.0,
                    "b_min": "$@hr_range[0]",
                    "b_max": "$@hr_range[1]",
                    "clip": False,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "sr",
                    "output_dtype": "$torch.float32",
                    "resample": False,
                    "separate_folder": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@predict_network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _exported_state(net, ckpt: Path) -> dict:
    """The checkpoint's entries that the exported network holds (all of them, except for a
    network whose `EXPORT_ARGS` build an inference-only form, e.g. FUNIT's averaged generator
    without the trained one); refuses a checkpoint that lacks any or has other shapes."""
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    want = net.state_dict()
    missing = [k for k in want if k not in saved]
    wrong = [k for k in want if k in saved and saved[k].shape != want[k].shape]
    if missing or wrong:
        raise InputError(
            ckpt,
            f"does not fit the exported network: missing {missing[:3]}, other shapes {wrong[:3]}"
            " (was it trained with another net_preset?)",
        )
    state = {k: saved[k] for k in want}
    net.load_state_dict(state)
    return state


def _torchscript(root: Path) -> Path:
    """``models/model.ts``: MONAI's ``ckpt_export`` of the exported bundle, run in its folder as
    a user would (so the network comes from its ``scripts/``), with ``configs/metadata.json``
    and ``configs/inference.json`` embedded as TorchScript extra files."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--bundle_root", ".",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if res.returncode != 0 or not (root / "models" / "model.ts").is_file():
        raise InputError(root.name, f"ckpt_export failed: {(res.stderr or res.stdout)[-1500:]}")
    return root / "models" / "model.ts"


def export_bundle(
    bundle: str | Path,
    output: str | Path,
    variant: str = "3d",
    checkpoint: str | Path | None = None,
    self_ensemble: bool | None = None,
) -> Path:
    """Write ``output`` (a zip whose top folder is the bundle's name); see the module docstring.

    ``self_ensemble``: the exported default of the mirror self-ensemble
    (`bone3d.inference.ensemble`); None: the bundle's ``self_ensemble`` setting."""
    from monai.bundle import ConfigParser

    from bone3d.engines import bundle_configs
    from bone3d.inference import read_meta
    from bone3d.nets import build_spec

    bundle = Path(bundle)
    if not (bundle / "configs" / "inference.json").is_file():
        raise InputError(bundle, "not a bone3d bundle (no configs/inference.json)")
    if not (bundle / "configs" / f"{variant}.json").is_file():
        raise InputError(bundle / "configs" / f"{variant}.json", "no such variant")
    output = Path(output)
    if output.suffix != ".zip":
        raise InputError(output, "the exported bundle is a .zip")
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, "inference", variant))
    parser["bundle_root"] = str(bundle)
    ckpt = (
        Path(checkpoint) if checkpoint else Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
    )
    if not ckpt.is_file():
        raise InputError(ckpt, "no trained weights: train the bundle first or pass --checkpoint")
    meta = read_meta(ckpt.parent / "data_meta.json")
    model_name = parser["model_name"]
    slab = meta.get("slab")
    spatial_dims = int(meta.get("spatial_dims", 3))
    scale = meta.get("scale")
    if scale is not None and not isinstance(scale, int):
        raise InputError(ckpt.parent / "data_meta.json", "export needs one integer scale")
    cls, args = build_spec(
        model_name,
        spatial_dims,
        meta.get("net_preset", "cpu3d"),
        in_channels=1 if slab is None else 2 * int(slab) + 1,
        out_channels=scale if (scale and slab is not None) else 1,
        scale=scale,
    )
    args = {**args, **getattr(cls, "EXPORT_ARGS", {})}
    state = _exported_state(cls(**args), ckpt)
    module = cls.__module__.rsplit(".", 1)[-1]
    patch = list(parser["patch_size"])
    name = bundle.name
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        _copy_scripts(root / "scripts", _module_closure(module), slab is not None)
        (root / "configs").mkdir()
        (root / "models").mkdir()
        (root / "docs").mkdir()
        cfg = inference_config(
            f"scripts.{module}.{cls.__name__}",
            args,
            meta,
            patch,
            int(parser["sw_batch_size"]),
            float(parser["sw_overlap"]),
            None if slab is None else int(slab),
            scale,
            bool(parser["self_ensemble"]) if self_ensemble is None else self_ensemble,
        )
        (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        metadata["required_packages_version"] = {
            k: v for k, v in metadata["required_packages_version"].items() if k == "nibabel"
        }
        metadata["changelog"] = {
            metadata["version"]: f"exported by bone3d ({variant} variant, inference only)",
            **metadata["changelog"],
        }
        out_shape = patch if slab is None else patch[:2]
        in_shape = [p // (scale or 1) for p in out_shape]
        for io, shape in (("inputs", in_shape), ("outputs", out_shape)):
            for spec in metadata["network_data_format"][io].values():
                spec["spatial_shape"] = shape
        key = metadata["network_data_format"]["inputs"]["image"]
        key["num_channels"] = 1 if slab is None else 2 * int(slab) + 1
        pred = metadata["network_data_format"]["outputs"]["pred"]
        pred["num_channels"] = scale if (scale and slab is not None) else 1
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
        shutil.copy(bundle / "configs" / "logging.conf", root / "configs" / "logging.conf")
        shutil.copy(bundle / "LICENSE", root / "LICENSE")
        import torch

        torch.save(state, root / "models" / "model.pt")
        _torchscript(root)
        (root / "models" / "data_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        readme = (bundle / "docs" / "README.md").read_text()
        readme += (
            f"\n## This exported copy\n\nExported by `bone3d export` ({variant} variant, weights "
            f"from `{ckpt.name}`): inference only, with MONAI components and the network code in "
            "`scripts/`; bone3d is not needed.\n\n```bash\n"
            "python -m monai.bundle run --config_file configs/inference.json "
            "--meta_file configs/metadata.json --logging_file configs/logging.conf \\\n"
            "  --bundle_root . --input_image LR.nii.gz --output_dir out   # writes out/LR_sr.nii.gz\n"
            "```\n\nThe LR scan is resampled to the HR spacing by MONAI's `Spacingd` "
            "(bilinear, voxel-edge extent); `bone3d infer` places the HR grid on the LR field "
            "of view the same way. `models/model.ts` is the network alone in TorchScript "
            "(`torch.jit.load`), made by `python -m monai.bundle ckpt_export`.\n"
        )
        (root / "docs" / "README.md").write_text(readme)
        with atomic_path(output) as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(root.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(Path(tmp)))
    return output
