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
* has a ``train.json`` that fine-tunes those weights on the user's registered LR/HR pairs, with
  MONAI's dictionary transforms, ``CacheDataset``, ``SupervisedTrainer`` and checkpoint handlers,
  bone3d's paired-grid transforms (`bone3d.engines.plain`) and morphometry loss
  (`bone3d.losses.morphometry`) copied into ``scripts/`` (`train_config`);
* carries ``models/model.pt`` (a plain state dict of what the exported network holds: a
  network class's ``EXPORT_ARGS`` may build an inference-only form, as FUNIT's averaged
  generator without the trained one), ``models/model.ts`` (its TorchScript form, MONAI's
  ``ckpt_export`` run in the exported folder), ``metadata.json``, ``logging.conf``,
  ``docs/README.md`` and ``LICENSE``.

MONAI adds the bundle root to ``sys.path`` before ``run``, so ``scripts`` imports when the bundle
is run with ``python -m monai.bundle run --config_file <bundle>/configs/inference.json``.
bone3d's own training data path (TorchIO queues) and the frozen regressor are not exported:
the fine-tuning config reads pairs with MONAI transforms. A paired GAN (pix2pix, pix2pixHD,
ESRGAN, R2-RCANGAN) fine-tunes adversarially, as it trained: bone3d's `PairedGANStep` is
copied into ``scripts/gan.py``, the discriminator's code beside the generator's, and its
trained weights (from the training's last checkpoint) into ``models/discriminator.pt``
(`gan_stage`). The unpaired GANs' generators (CycleGAN, StarGAN, FUNIT) fine-tune on pairs by
the loss alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from bone3d.errors import InputError
from bone3d.io import atomic_path

_NET_IMPORT = re.compile(r"^from bone3d\.nets\.(\w+) import", re.MULTILINE)


def _forget_scripts() -> None:
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@contextlib.contextmanager
def exported_scripts(root: Path):
    """An exported bundle's ``scripts`` package importable, as ``monai.bundle run`` finds it from
    the bundle root, and forgotten afterwards (``sys.path`` restored, ``scripts`` modules
    dropped, MONAI's own ``sys.path`` entry included). Every export has a ``scripts`` package of
    its own under the same name: without this, a second exported bundle run in one process
    would resolve its network from the first one's cached modules. Python's import system has
    no per-call namespace, so this is done by hand."""
    before = list(sys.path)
    _forget_scripts()
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path[:] = before
        _forget_scripts()


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


# the one bone3d import of bone3d.losses.morphometry: its optional regressor term (lazy)
_REGRESSOR_IMPORT = "            from bone3d.losses.regressor import RegressorLoss\n"


def _copy_scripts(dest: Path, modules: list[str], slab: bool) -> None:
    import bone3d.engines.gan as gan
    import bone3d.engines.plain as plain
    import bone3d.inference as inference
    import bone3d.losses.morphometry as morphometry_loss
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
    src = Path(plain.__file__).read_text()
    if "from bone3d" in src or "import bone3d" in src:
        raise InputError("bone3d.engines.plain", "imports bone3d; cannot export")
    (dest / "plain.py").write_text(src)
    src = Path(morphometry_loss.__file__).read_text()
    if src.count("from bone3d") != 1 or _REGRESSOR_IMPORT not in src:
        raise InputError("bone3d.losses.morphometry", "imports bone3d; cannot export")
    # the frozen regressor (bone3d fit-regressor) is not exported: its term needs bone3d
    no_regressor = '            raise ValueError("the regressor term needs bone3d")\n'
    (dest / "morphometry_loss.py").write_text(src.replace(_REGRESSOR_IMPORT, no_regressor))
    src = Path(gan.__file__).read_text()
    if re.search(r"^\s*(from|import)\s+bone3d", src, re.MULTILINE):
        raise InputError("bone3d.engines.gan", "imports bone3d; cannot export")
    (dest / "gan.py").write_text(src)


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
    inferer = _inferer(roi, sw_batch, overlap, slab)
    return {
        "imports": ["$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_image": "lr.nii.gz",
        "output_dir": "$@bundle_root + '/eval'",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "hr_spacing_mm": [float(v) for v in meta["hr_spacing_mm"]],
        "scale": s,
        "lr_range": [lr0, lr1],
        "hr_range": [hr0, hr1],
        "network_def": {"_target_": target, **_json_value(args)},
        "network": "$@network_def.to(@device)",
        "self_ensemble": bool(self_ensemble),
        "ensemble": {"_target_": "scripts.ensemble.FlipEnsemble", "network": "@network"},
        "predict_network": "$@ensemble if str(@self_ensemble).lower() == 'true' else @network",
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
                "load_path": "@ckpt_path",
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


def _inferer(roi, sw_batch, overlap, slab) -> dict:
    """The sliding-window inferer of the exported configs: MONAI's, or for 2D and 2.5D models
    bone3d's slab inferer (copied into ``scripts/``)."""
    if slab is None:
        return {
            "_target_": "SlidingWindowInferer",
            "roi_size": roi,
            "sw_batch_size": sw_batch,
            "overlap": overlap,
            "mode": "gaussian",
        }
    return {
        "_target_": "scripts.slab.SlabInferer",
        "roi_size": roi,
        "slab": slab,
        "sw_batch_size": sw_batch,
        "overlap": overlap,
    }


def training_params(ckpt: Path) -> dict | None:
    """The settings a checkpoint was trained with: ``train_params.json`` beside it, the run's
    MLflow parameters (``mlflow_params``), which bundle trainings write when they start. None
    for a checkpoint trained before bundles wrote it (the export then falls back on the
    bundle's defaults)."""
    f = Path(ckpt).parent / "train_params.json"
    if not f.is_file():
        return None
    try:
        params = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f, f"not JSON ({err})") from None
    if not isinstance(params, dict):
        raise InputError(f, "not a JSON object")
    return params


def morphometry_settings(bundle: Path, params: dict | None = None) -> dict | None:
    """The morphometry-loss settings of the exported fine-tuning: the weights, the loss's
    constructor arguments, the warm-up iterations and ``on`` (the default of its
    ``--morphometry`` switch); None where bone3d's ``bundles/common/morphometry_loss_base.json``
    is missing.

    The training's own (``params``, `training_params`) where it recorded them: a model trained
    with the loss fine-tunes with its weights, radii and threshold (a frozen-regressor term
    dropped: the regressor is not exported), one trained without it fine-tunes by the pixel
    loss, the loss one switch away. Without ``params``, the shared defaults, switched on."""
    f = bundle.parent / "common" / "morphometry_loss_base.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    radii = cfg["morphometry_loss_radii"]
    weights, threshold = cfg["morphometry_loss"], cfg["loss"]["threshold"]
    warmup, on = cfg["morphometry_loss_warmup"], True
    if params is not None:
        on = "morphometry_loss" in params
        if on:
            weights, radii = params["morphometry_loss"], params["morphometry_loss_radii"]
            threshold = params.get("morphometry_loss_threshold", threshold)
            warmup = params.get("morphometry_loss_warmup", warmup)
    return {
        "weights": {k: float(v) for k, v in weights.items() if k != "regressor"},
        "args": {
            "pixel": cfg["loss"]["pixel"],
            "threshold": threshold,
            "temperature": cfg["loss"]["temperature"],
            "thickness_radius": int(radii[0]),
            "spacing_radius": int(radii[1]),
        },
        "warmup": int(warmup),
        "on": on,
    }


_PAIRED_GAN = "bone3d.engines.gan.PairedGANStep"


def gan_stage(bundle: Path, variant: str, ckpt: Path, meta: dict) -> dict | None:
    """The adversarial stage of a paired-GAN bundle (its training step `PairedGANStep`:
    pix2pix, pix2pixHD, ESRGAN, R2-RCANGAN), for the exported ``train.json``; None for every
    other bundle (the unpaired GANs' steps need both domains' generators and are not exported).

    The discriminator, loss kind, conditioning and weights are the training's, as its
    ``train_params.json`` records them (`training_params`), else the bundle's.
    Returns the discriminator's class and constructor arguments (`bone3d.nets.build_spec` with
    that ``d_name``, the variant's dimensions and the checkpoint's preset; its input is
    the generator's input channels, when conditional, plus its output channels), the step's
    loss kind, conditioning and weights (a perceptual weight set to 0: the in-project regressor
    is not exported), D's optimiser betas, and D's trained weights: the ``discriminator`` entry
    of the newest ``checkpoint_epoch=N.pt`` beside ``ckpt`` (the training's last epoch), or None
    when there is none (the exported D then starts from its initialisation)."""
    import torch
    from monai.bundle import ConfigParser

    from bone3d.engines import bundle_configs
    from bone3d.engines.plain import latest_checkpoint
    from bone3d.nets import build_spec

    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, "train", variant))
    step = parser.get("gan_step")
    if not isinstance(step, dict) or step.get("_target_") != _PAIRED_GAN:
        return None
    # the training's own settings where it recorded them (`training_params`), else the bundle's
    params = training_params(ckpt) or {}
    trained = {"d_name": params.get("discriminator", parser["d_name"]),
               "gan_loss": params.get("gan_loss", parser["gan_loss"]),
               "conditional": params.get("conditional", parser["conditional"]),
               "loss_weights": params.get("loss_weights", parser["loss_weights"])}  # fmt: skip
    slab, scale = meta.get("slab"), meta.get("scale")
    g_in = 1 if slab is None else 2 * int(slab) + 1
    g_out = scale if (scale and slab is not None) else 1
    conditional = bool(trained["conditional"])
    cls, args = build_spec(
        trained["d_name"],
        int(meta.get("spatial_dims", 3)),
        meta.get("net_preset", "cpu3d"),
        in_channels=(g_in if conditional else 0) + g_out,
    )
    state = None
    last = latest_checkpoint(ckpt.parent)
    if last is not None:
        saved = torch.load(last, map_location="cpu", weights_only=True)
        state = saved.get("discriminator") if isinstance(saved, dict) else None
    weights = {k: float(v) for k, v in trained["loss_weights"].items()}
    weights["perceptual"] = 0.0
    return {
        "d_name": str(trained["d_name"]),
        "cls": cls,
        "args": args,
        "gan_loss": str(trained["gan_loss"]),
        "conditional": conditional,
        "weights": weights,
        "betas": [float(b) for b in parser["d_optimizer"]["betas"]],
        "state": state,
        "from": None if state is None else Path(last).name,
    }


def train_config(
    target: str, args: dict, meta: dict, patch, sw_batch, overlap, slab, scale=None,
    morphometry: dict | None = None, patches_per_step: int = 2, gan: dict | None = None,
) -> dict:  # fmt: skip
    """The exported ``train.json``: fine-tunes the exported weights on registered LR/HR pairs
    in plain MONAI (the module docstring of `bone3d.engines.plain` has the data path).

    The datalist is bone3d's (MONAI decathlon style, ``image`` = LR, ``target`` = HR on the
    network's HR spacing; ``training`` and optionally ``validation`` lists). The windows, HR
    spacing, patch size and inferer are the training's; a step takes ``batch_size`` (1)
    volumes, ``samples_per_volume`` (``patches_per_step``, the training's batch size) patches
    from each. The loss is ``morphometry``'s `bone3d.losses.MorphometryLoss`
    (`morphometry_settings`; its module copied into ``scripts/``), switched on by default where
    ``morphometry["on"]``, ramped in over its warm-up iterations without the pixel-only
    pre-training (the weights are trained); ``--morphometry false`` or no ``morphometry``: the
    L1 pixel loss.

    ``gan`` (`gan_stage`, with ``target``, the discriminator's ``scripts.<module>.<Class>``):
    a paired GAN fine-tunes adversarially, as it trained. The trainer's step is bone3d's
    `PairedGANStep` (``scripts/gan.py``) with the training's loss kind, conditioning and
    weights (``gan_weights``; ``content`` multiplies the loss above); D starts from
    ``models/discriminator.pt`` where the export holds one, is checkpointed and resumed with
    G, and learns at ``d_learning_rate`` (G's rate unless set). ``--gan false`` fine-tunes G by
    the loss alone, as for every other bundle.

    Writes into ``output_dir`` (``finetune/``): ``checkpoint_epoch=N.pt`` every epoch (model,
    optimiser, trainer; a rerun resumes from the newest, and since every epoch's random draws
    are seeded from ``(seed, epoch)`` (`EpochSeed`) it ends with the same weights as an
    uninterrupted run) and ``model.pt``, the best weights on the validation pairs by PSNR
    (the last epoch's without validation pairs; kept across a resume), which
    ``inference.json --ckpt_path finetune/model.pt`` runs. ``models/model.pt`` is never written.
    """
    s = int(scale) if scale else 1
    lr0, lr1 = (float(x) for x in meta["lr_range"])
    hr0, hr1 = (float(x) for x in meta["hr_range"])
    keys = ["image", "target"]

    def load(pack: bool) -> list:
        return [
            {"_target_": "LoadImaged", "keys": keys, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "$@lr_range[0]",
             "a_max": "$@lr_range[1]", "b_min": 0.0, "b_max": 1.0, "clip": False},
            {"_target_": "ScaleIntensityRanged", "keys": "target", "a_min": "$@hr_range[0]",
             "a_max": "$@hr_range[1]", "b_min": 0.0, "b_max": 1.0, "clip": False},
            {"_target_": "scripts.plain.PairGridd", "hr_spacing_mm": "@hr_spacing_mm",
             "scale": "@scale", "pack": pack},
        ]  # fmt: skip

    augment = [
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@roi_size", "mode": "edge"},
        {"_target_": "RandSpatialCropSamplesd", "keys": keys, "roi_size": "@roi_size",
         "num_samples": "@samples_per_volume", "random_size": False},
        *([{"_target_": "scripts.plain.Unpackd", "scale": "@scale"}] if s > 1 else []),
        *({"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": ax}
          for ax in range(3)),
        *([{"_target_": "scripts.plain.SlabChannelsd", "slab": "@slab", "scale": "@scale"}]
          if slab is not None else []),
    ]  # fmt: skip
    pixel = {"_target_": "torch.nn.L1Loss"}
    if morphometry:
        loss = "$@morphometry_loss_fn if str(@morphometry).lower() == 'true' else @pixel_loss"
        loss_parts = {
            "morphometry": bool(morphometry.get("on", True)),
            "morphometry_loss": morphometry["weights"],
            "morphometry_loss_warmup": int(morphometry["warmup"]),
            "pixel_loss": pixel,
            "morphometry_loss_fn": {
                "_target_": "scripts.morphometry_loss.MorphometryLoss",
                "weights": "@morphometry_loss",
                **morphometry["args"],
            },
        }
        warmup = [
            {
                "_target_": "scripts.morphometry_loss.MorphometryWarmup",
                "_disabled_": "$str(@morphometry).lower() != 'true'",
                "loss": "@loss",
                "iterations": "@morphometry_loss_warmup",
            }
        ]
    else:
        loss, loss_parts, warmup = pixel, {}, []
    saver = "scripts.plain.atomic_checkpoint_saver"
    gan_parts, d_init, d_saved, gan_log, step = {}, [], {}, [], {}
    if gan:
        on = "str(@gan).lower() == 'true'"
        gan_parts = {
            "gan": True,
            "gan_loss": gan["gan_loss"],
            "conditional": gan["conditional"],
            "gan_weights": gan["weights"],
            "d_learning_rate": "@learning_rate",
            "discriminator_def": {"_target_": gan["target"], **_json_value(gan["args"])},
            "discriminator": "$@discriminator_def.requires_grad_(True).to(@device)",
            "d_optimizer": {
                "_target_": "torch.optim.Adam",
                "params": "$@discriminator.parameters()",
                "lr": "@d_learning_rate",
                "betas": gan["betas"],
            },
            "d_init_weights": "$@bundle_root + '/models/discriminator.pt'",
            "gan_step": {
                "_target_": "scripts.gan.PairedGANStep",
                "discriminator": "@discriminator",
                "d_optimizer": "@d_optimizer",
                "gan_loss": "@gan_loss",
                "weights": "@gan_weights",
                "conditional": "@conditional",
            },
        }
        d_init = [
            {
                "_target_": "CheckpointLoader",
                "_disabled_": "$@resume_from is not None or not os.path.isfile(@d_init_weights)",
                "load_path": "@d_init_weights",
                "load_dict": {"discriminator": "@discriminator"},
                "map_location": "@device",
            }
        ]
        d_saved = {"discriminator": "@discriminator", "d_optimizer": "@d_optimizer"}
        gan_log = [
            {
                "_target_": "StatsHandler",
                "_disabled_": f"$not ({on})",
                "tag_name": "gan",
                "output_transform": {"_target_": "scripts.gan.gan_losses", "_mode_": "callable"},
            }
        ]
        step = {"iteration_update": f"$@gan_step if {on} else None"}
    return {
        "imports": ["$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": "datalist.json",
        "training_data": {
            "_target_": "scripts.plain.datalist_pairs",
            "datalist": "@datalist",
            "split": "training",
        },
        "validation_data": {
            "_target_": "scripts.plain.datalist_pairs",
            "datalist": "@datalist",
            "split": "validation",
            "required": False,
        },
        "output_dir": "$@bundle_root + '/finetune'",
        "init_weights": "$@bundle_root + '/models/model.pt'",
        "resume": True,
        "resume_from": {
            "_target_": "scripts.plain.resume_checkpoint",
            "ckpt_dir": "@output_dir",
            "resume": "@resume",
        },
        "hr_spacing_mm": [float(v) for v in meta["hr_spacing_mm"]],
        "scale": s,
        "slab": slab,
        "lr_range": [lr0, lr1],
        "hr_range": [hr0, hr1],
        "patch_size": [int(p) for p in patch],
        "roi_size": "$[p // @scale for p in @patch_size]",
        "batch_size": 1,
        "samples_per_volume": int(patches_per_step),
        "max_epochs": 10,
        "val_interval": 1,
        "learning_rate": 1e-4,
        "seed": 0,
        "network_def": {"_target_": target, **_json_value(args)},
        "network": "$@network_def.requires_grad_(True).to(@device)",
        **loss_parts,
        "loss": loss,
        **gan_parts,
        "optimizer": {
            "_target_": "torch.optim.Adam",
            "params": "$@network.parameters()",
            "lr": "@learning_rate",
        },
        "inferer": _inferer([int(p) // s for p in patch], sw_batch, overlap, slab),
        "train": {
            "preprocessing": {"_target_": "Compose", "transforms": load(s > 1) + augment},
            "dataset": {
                "_target_": "CacheDataset",
                "data": "@training_data",
                "transform": "@train#preprocessing",
                "num_workers": 0,
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": "@batch_size",
                "shuffle": True,
                "num_workers": 0,
            },
            "handlers": [
                {
                    "_target_": "CheckpointLoader",
                    "_disabled_": "$@resume_from is not None",
                    "load_path": "@init_weights",
                    "load_dict": {"model": "@network"},
                    "map_location": "@device",
                },
                *d_init,
                # every epoch a function of (seed, epoch): a resumed run replays the draws
                {
                    "_target_": "scripts.plain.EpochSeed",
                    "seed": "@seed",
                    "loader": "@train#dataloader",
                },
                *warmup,
                {
                    "_target_": "ValidationHandler",
                    "_disabled_": "$not @validation_data",
                    "validator": "@validate#evaluator",
                    "epoch_level": True,
                    "interval": "@val_interval",
                },
                {
                    "_target_": "StatsHandler",
                    "tag_name": "train_loss",
                    "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                },
                *gan_log,
                {
                    "_target_": saver,
                    "_disabled_": "$bool(@validation_data)",
                    "save_dir": "@output_dir",
                    "save_dict": {"model": "@network"},
                    "save_final": True,
                    "final_filename": "model.pt",
                },
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "device": "@device",
                "max_epochs": "@max_epochs",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "@loss",
                "prepare_batch": {"_target_": "scripts.plain.pair_batch", "_mode_": "callable"},
                "train_handlers": "@train#handlers",
                "amp": False,
                **step,
            },
            "checkpointer": {
                "_target_": saver,
                "save_dir": "@output_dir",
                "save_dict": {
                    "model": "@network",
                    "optimizer": "@optimizer",
                    **d_saved,
                    "trainer": "@train#trainer",
                },
                "save_interval": 1,
                "n_saved": 1,
            },
            "resumer": {
                "_target_": "CheckpointLoader",
                "_disabled_": "$@resume_from is None",
                "load_path": "@resume_from",
                "load_dict": {
                    "model": "@network",
                    "optimizer": "@optimizer",
                    **d_saved,
                    "trainer": "@train#trainer",
                },
                "map_location": "@device",
            },
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": load(False)},
            "dataset": {
                "_target_": "CacheDataset",
                "data": "@validation_data",
                "transform": "@validate#preprocessing",
                "num_workers": 0,
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@validate#dataset",
                "batch_size": 1,
                "shuffle": False,
                "num_workers": 0,
            },
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {
                    "_target_": saver,
                    "save_dir": "@output_dir",
                    "save_dict": {"model": "@network"},
                    "save_key_metric": True,
                    "key_metric_filename": "model.pt",
                    "resume_from": "@resume_from",
                },
            ],
            "key_metric": {
                "val_psnr": {
                    "_target_": "PeakSignalToNoiseRatio",
                    "max_val": 1.0,
                    "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                }
            },
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "prepare_batch": {"_target_": "scripts.plain.pair_batch", "_mode_": "callable"},
                "key_val_metric": "@validate#key_metric",
                "val_handlers": "@validate#handlers",
                "amp": False,
            },
        },
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": [
            "$@train#checkpointer.attach(@train#trainer)",
            "$@train#resumer.attach(@train#trainer) if @train#resumer is not None else None",
            "$@train#trainer.run()",
        ],
    }


def multi_gpu_train_config(train: dict) -> dict:
    """The exported ``multi_gpu_train.json``: an overlay on ``train.json`` (MONAI model-zoo
    convention) for ``torchrun --nproc_per_node=N -m monai.bundle run --config_file
    "['configs/train.json','configs/multi_gpu_train.json']"``.

    One process per GPU (``LOCAL_RANK``; CPU processes with ``gloo`` where there is none), the
    network wrapped in ``DistributedDataParallel``, training and validation pairs split over
    the ranks by MONAI's ``DistributedSampler`` (whose epoch MONAI's trainer sets, so each
    epoch reshuffles), random draws seeded from ``(seed, epoch, rank)`` (`EpochSeed`) and the
    validation PSNR reduced over the ranks by ignite. Only rank 0 writes checkpoints and
    ``model.pt`` (MONAI's savers store the unwrapped network, so ``inference.json`` loads
    them as they are); MONAI's MLflow settings log from rank 0 alone."""
    saver = "scripts.plain.atomic_checkpoint_saver"
    final = next(i for i, h in enumerate(train["train"]["handlers"]) if h["_target_"] == saver)
    best = next(i for i, h in enumerate(train["validate"]["handlers"]) if h["_target_"] == saver)
    sampler = {"_target_": "DistributedSampler", "even_divisible": True}
    # a paired GAN's discriminator is wrapped as the generator is (its gradients averaged too)
    d = (
        {
            "discriminator": {
                "_target_": "torch.nn.parallel.DistributedDataParallel",
                "module": "$@discriminator_def.requires_grad_(True).to(@device)",
                "device_ids": "$[@device] if torch.cuda.is_available() else None",
                "broadcast_buffers": False,
            }
        }
        if "discriminator_def" in train
        else {}
    )
    return {
        "+imports": ["$import torch.distributed as dist"],
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK']) "
        "if torch.cuda.is_available() else torch.device('cpu')",
        "rank": "$dist.get_rank()",
        "network": {
            "_target_": "torch.nn.parallel.DistributedDataParallel",
            "module": "$@network_def.requires_grad_(True).to(@device)",
            "device_ids": "$[@device] if torch.cuda.is_available() else None",
            "broadcast_buffers": False,
        },
        **d,
        "train#sampler": {**sampler, "dataset": "@train#dataset", "shuffle": True},
        "train#dataloader#shuffle": False,
        "train#dataloader#sampler": "@train#sampler",
        "validate#sampler": {**sampler, "dataset": "@validate#dataset", "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        f"train#handlers#{final}#_disabled_": "$bool(@validation_data) or @rank > 0",
        f"validate#handlers#{best}#_disabled_": "$@rank > 0",
        "initialize": [
            "$dist.is_initialized() or dist.init_process_group("
            "backend='nccl' if torch.cuda.is_available() else 'gloo')",
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            "$monai.utils.set_determinism(seed=@seed + @rank)",
        ],
        "run": [
            "$@train#checkpointer.attach(@train#trainer) if @rank == 0 else None",
            "$@train#resumer.attach(@train#trainer) if @train#resumer is not None else None",
            "$@train#trainer.run()",
        ],
        "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
    }


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
    from bone3d.nets import build_spec, load_weights

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
    # the network the weights were trained as (a GAN stage may train another generator)
    model_name = meta.get("model_name") or parser["model_name"]
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
        inference=True,
    )
    state = load_weights(cls(**args), ckpt)
    module = cls.__module__.rsplit(".", 1)[-1]
    gan = gan_stage(bundle, variant, ckpt, meta)
    modules = _module_closure(module)
    if gan:
        d_module = gan["cls"].__module__.rsplit(".", 1)[-1]
        modules += [m for m in _module_closure(d_module) if m not in modules]
        gan["target"] = f"scripts.{d_module}.{gan['cls'].__name__}"
        if gan["state"] is not None:  # D's trained weights must fit the exported D
            d = gan["cls"](**gan["args"])
            try:
                d.load_state_dict(gan["state"])
            except RuntimeError as err:
                detail = " ".join(str(err).split())[:300]
                raise InputError(
                    ckpt.parent / gan["from"],
                    f"its discriminator does not fit {gan['d_name']} "
                    f"with the checkpoint's preset ({detail})",
                ) from None
            gan["state"] = d.state_dict()
    patch = list(parser["patch_size"])
    name = bundle.name
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        _copy_scripts(root / "scripts", modules, slab is not None)
        (root / "configs").mkdir()
        (root / "models").mkdir()
        (root / "docs").mkdir()
        common = (
            f"scripts.{module}.{cls.__name__}",
            args,
            meta,
            patch,
            int(parser["sw_batch_size"]),
            float(parser["sw_overlap"]),
            None if slab is None else int(slab),
            scale,
        )
        cfg = inference_config(
            *common, bool(parser["self_ensemble"]) if self_ensemble is None else self_ensemble
        )
        (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
        params = training_params(ckpt)
        morphometry = morphometry_settings(bundle, params)
        train = train_config(*common, morphometry, int(parser.get("batch_size", 2)), gan)
        (root / "configs" / "train.json").write_text(json.dumps(train, indent=4) + "\n")
        (root / "configs" / "multi_gpu_train.json").write_text(
            json.dumps(multi_gpu_train_config(train), indent=4) + "\n"
        )
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        metadata["required_packages_version"] = {
            k: v for k, v in metadata["required_packages_version"].items() if k == "nibabel"
        }
        if morphometry:  # train.json's morphometry loss takes its Otsu level with scikit-image
            import skimage

            metadata["required_packages_version"]["scikit-image"] = skimage.__version__
        metadata["changelog"] = {
            metadata["version"]: f"exported by bone3d ({variant} variant; inference, fine-tuning)",
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
        if gan and gan["state"] is not None:
            torch.save(gan["state"], root / "models" / "discriminator.pt")
        _torchscript(root)
        (root / "models" / "data_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if not gan:
            gan_text = (
                "An unpaired GAN's generator is fine-tuned by that loss alone."
                if "d_name" in json.loads((bundle / "configs" / "train.json").read_text())
                else ""
            )
        else:
            gan_text = (
                "The generator trained adversarially and fine-tunes so: bone3d's paired GAN "
                f"step (`scripts/gan.py`; {gan['gan_loss']} loss, "
                + ("conditional " if gan["conditional"] else "unconditional ")
                + f"discriminator `{gan['target']}`, weights "
                + ", ".join(f"{k} {v:g}" for k, v in gan["weights"].items() if k != "perceptual")
                + ", `content` multiplying the loss above) with the discriminator "
                + (
                    f"starting from its trained weights (`models/discriminator.pt`, from "
                    f"`{gan['from']}`)"
                    if gan["state"] is not None
                    else "starting afresh (the export found no training checkpoint with its "
                    "weights)"
                )
                + ", checkpointed and resumed with the generator; `--d_learning_rate` sets its "
                "rate (the generator's by default), `--gan false` fine-tunes by the loss alone."
            )
        readme = (bundle / "docs" / "README.md").read_text()
        readme += (
            f"\n## This exported copy\n\nExported by `bone3d export` ({variant} variant, weights "
            f"from `{ckpt.name}`): inference and fine-tuning with MONAI components and the "
            "network code in `scripts/`; bone3d is not needed.\n\n```bash\n"
            "python -m monai.bundle run --config_file configs/inference.json "
            "--meta_file configs/metadata.json --logging_file configs/logging.conf \\\n"
            "  --bundle_root . --input_image LR.nii.gz --output_dir out   # writes out/LR_sr.nii.gz\n"
            "```\n\nThe LR scan is resampled to the HR spacing by MONAI's `Spacingd` "
            "(bilinear, voxel-edge extent); `bone3d infer` places the HR grid on the LR field "
            "of view the same way. `models/model.ts` is the network alone in TorchScript "
            "(`torch.jit.load`), made by `python -m monai.bundle ckpt_export`.\n\n"
            "### Fine-tuning on your own scans\n\n```bash\n"
            "python -m monai.bundle run --config_file configs/train.json "
            "--meta_file configs/metadata.json --logging_file configs/logging.conf \\\n"
            "  --bundle_root . --datalist /data/datalist.json --max_epochs 20 "
            "[--tracking mlflow]\n"
            "python -m monai.bundle run --config_file configs/inference.json "
            "--bundle_root . --ckpt_path finetune/model.pt --input_image LR.nii.gz\n"
            "```\n\nThe datalist is MONAI decathlon style: `training` (and, for choosing the "
            'best epoch by PSNR, `validation`) lists of `{"image": LR, "target": HR}`, '
            "paths relative to the datalist, each HR registered to its LR (same field of view; "
            "`bone3d register` writes such pairs) and at this model's HR spacing "
            f"({', '.join(f'{v:g}' for v in meta['hr_spacing_mm'])} mm). The LR is resampled "
            "onto the network's input grid derived from the HR's, both are mapped to the "
            "training's intensity windows, and random patches of the training's size are "
            "drawn with random flips. The loss is "
            + (
                "bone3d's morphometry-aware loss (`scripts/morphometry_loss.py`: pixel L1 plus "
                "soft BV/TV, thickness, spacing, Euler and fabric terms; needs scikit-image; "
                "`--morphometry false` for the L1 loss alone)"
                + (
                    ", with the weights, radii and threshold the model trained with"
                    if params and morphometry["on"]
                    else ""
                )
                if morphometry and morphometry["on"]
                else "the L1 pixel loss"
                + (
                    ", as the model trained (`--morphometry true` switches on bone3d's "
                    "morphometry-aware loss, `scripts/morphometry_loss.py`, at its default "
                    "settings; needs scikit-image)"
                    if morphometry
                    else ""
                )
            )
            + ". Checkpoints go to `finetune/` every epoch and an interrupted run resumes "
            "from the newest, ending with the weights an uninterrupted run would (every "
            "epoch's random draws are seeded from the `seed` and the epoch; `--resume false` "
            "starts again from `models/model.pt`, which is never overwritten, and refuses a "
            "`finetune/` that holds an earlier run's checkpoints); `finetune/model.pt` holds "
            "the best weights on the validation pairs (the last epoch's without them), also "
            "across a resume (the best score is kept in `finetune/model.key_metric.json`). "
            + gan_text
            + "\n\nOn several GPUs (one process each; CPU processes with `gloo` where "
            "there is none) add `configs/multi_gpu_train.json` and launch with torchrun: the "
            "pairs are split over the ranks, gradients averaged by `DistributedDataParallel`, "
            "and rank 0 alone writes `finetune/`.\n\n```bash\n"
            "torchrun --nproc_per_node=2 -m monai.bundle run --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\" \\\n"
            "  --bundle_root . --datalist /data/datalist.json --max_epochs 20\n```\n"
        )
        (root / "docs" / "README.md").write_text(readme)
        with atomic_path(output) as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(root.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(Path(tmp)))
    return output
