"""Every bundle in ``bundles/`` (all but the shared ``common``), every variant, through MONAI.

For each: the layout, the ``--pretrained_g`` warm start, and a 2-epoch ``python -m monai.bundle
run`` with the ``tiny`` preset (train, validate, MLflow) followed by whole-volume inference with
``bone3d infer``. MONAI's model-zoo checks (``verify_metadata``, ``verify_net_in_out``,
``ckpt_export``) run through ``ci/verify_bundle.py`` in ``test_verify_bundle.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from bone3d.cli import main as bone3d_main
from bone3d.data.datalist import datalist_items, experiment_name, hr_bone_level
from bone3d.data.prepare import prepare
from bone3d.engines import bundle_cli_args
from bone3d.io import read_volume

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs").is_dir())
DEPTH = {"3d": 32, "2d": 1, "2p5d": 5}  # 2D/2.5D: LR slices per slab (x scale for SR models)


def _run(args, cwd):
    res = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, encoding="utf-8"
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _train_config(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "train.json").read_text())


def test_every_bundle_has_the_monai_layout():
    assert {b.name for b in BUNDLES} >= {"unet_sr", "pix2pix"}
    for b in BUNDLES:
        for name in ("metadata.json", "train.json", "inference.json", "evaluate.json",
                     "2d.json", "2p5d.json", "3d.json", "multi_gpu_train.json", "logging.conf"):  # fmt: skip
            assert (b / "configs" / name).is_file(), f"{b.name}: configs/{name}"
        assert (b / "docs" / "README.md").is_file() and (b / "LICENSE").is_file()
        meta = json.loads((b / "configs" / "metadata.json").read_text())
        fmt = meta["network_data_format"]
        assert set(fmt["inputs"]) == {"image"} and set(fmt["outputs"]) == {"pred"}
        # only PyPI packages (bone3d itself is not one), at the versions pinned for this project
        pins = dict(
            line.split("==")
            for line in (ROOT / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")
        )
        pins = {k.lower(): v.split("+")[0] for k, v in pins.items()}
        for pkg, version in meta["required_packages_version"].items():
            assert pins.get(pkg.lower()) == version, f"{b.name}: {pkg}=={version} not pinned"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_pretrained_g_warm_starts_every_bundle_but_not_a_resume(bundle, tmp_path):
    """``--pretrained_g MODEL.pt`` (``common/train_base.json``): when training starts, the
    weights of another run are loaded into the network it trains (a GAN's generator: the ESRGAN
    two-stage recipe; any model: fine-tuning from phantoms to real data); MLflow records the
    file. A run that resumes from its own checkpoint keeps that checkpoint instead."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader

    from bone3d.engines import bundle_configs

    meta = {"lr_range": [0, 1], "hr_range": [0, 1], "hr_spacing_mm": [0.05] * 3}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({**meta, "training": [], "validation": [], "test": []}))

    def parser(**over):
        p = ConfigParser()
        p.read_config(bundle_configs(bundle, "train", "3d"))
        p.update({"bundle_root": str(bundle), "datalist": str(datalist), "net_preset": "tiny",
                  "ckpt_dir": str(tmp_path / "run"), **over})  # fmt: skip
        return p

    donor = parser().get_parsed_content("network")
    with torch.no_grad():  # weights no initialisation draws: every parameter shifted
        for w in donor.parameters():
            w.add_(0.5)
    torch.save(donor.state_dict(), tmp_path / "model.pt")
    p = parser(pretrained_g=str(tmp_path / "model.pt"))
    assert p.get_parsed_content("mlflow_params")["pretrained_g"] == str(tmp_path / "model.pt")
    loader = p.get_parsed_content(f"train#handlers#{len(p['train#handlers']) - 1}")
    assert isinstance(loader, CheckpointLoader)
    network = p.get_parsed_content("network")
    assert not torch.equal(next(network.parameters()), next(donor.parameters()))
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 1
    loader(engine)
    for key, value in donor.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key
    # resuming: the run's own checkpoint wins, the warm start is off; without it, off as well
    resumed = parser(pretrained_g=str(tmp_path / "model.pt"), resume_from=str(tmp_path / "x.pt"))
    assert resumed.get_parsed_content(f"train#handlers#{len(p['train#handlers']) - 1}") is None
    assert parser().get_parsed_content(f"train#handlers#{len(p['train#handlers']) - 1}") is None


@pytest.fixture
def datalist(phantom_pairs):
    return phantom_pairs


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["3d", "2d", "2p5d"])
@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bundle_variant_trains_then_rebuilds_the_whole_stack(bundle, variant, datalist, tmp_path):
    models, db = tmp_path / "models", tmp_path / "mlruns.db"
    cfg = _train_config(bundle)
    depth = DEPTH[variant] * (1 if variant == "3d" else cfg.get("scale") or 1)
    patch = f"[32,32,{depth}]"
    _run(
        ["-m", "monai.bundle", "run", *bundle_cli_args(bundle, "train", variant),
         "--tracking", "mlflow", "--bundle_root", str(bundle), "--datalist", str(datalist),
         "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "runs"),
         "--tracking_uri", f"sqlite:///{db}", "--net_preset", "tiny", "--patch_size", patch,
         "--max_epochs", "2", "--val_interval", "2", "--samples_per_volume", "2",
         "--queue_length", "4"],
        cwd=tmp_path,
    )  # fmt: skip
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment_name(datalist))
    (run,) = client.search_runs([exp.experiment_id])
    params = run.data.params
    assert params["model"] == cfg["model_name"] and params["variant"] == variant
    assert params["spatial_dims"] == ("3" if variant == "3d" else "2")
    assert params["degradation_preset"] == "hrpqct" and params["split_hash"]
    for key in ("train_loss", "val_psnr", "val_ssim", "val_bvtv_abs_error"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert hist and all(np.isfinite(m.value) for m in hist), key
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2  # both epochs
    for key in ("val_tb_th_rel_error", "val_tb_sp_rel_error", "val_conn_d_rel_error"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key  # may be NaN
    if "d_name" in cfg:  # GAN bundles: D's losses are logged and D is checkpointed
        assert params["discriminator"] == cfg["d_name"] and params["gan_loss"] == cfg["gan_loss"]
        for key in ("train_loss_d", "train_loss_g_gan", "train_d_real", "train_d_fake"):
            assert client.get_metric_history(run.info.run_id, key), key
        ckpt = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
        assert {"model", "optimizer", "d_optimizer", "trainer"} <= set(ckpt)
        # paired GANs: one D; CycleGAN: the second generator and a D per domain
        assert "discriminator" in ckpt or {"network_ba", "d_a", "d_b"} <= set(ckpt)
    state = torch.load(models / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict

    test = datalist_items(datalist, "test")[0]
    out = tmp_path / "sr.nii.gz"
    code = bone3d_main(
        [
            "infer",
            str(bundle),
            test["image"],
            "-o",
            str(out),
            "--variant",
            variant,
            "--checkpoint",
            str(models / "model.pt"),
        ]
    )  # fmt: skip  (in-process: `bone3d infer`'s own subprocess tests are in test_bundle_unet)
    assert code == 0
    sr, hr = read_volume(out), read_volume(test["target"])
    s = cfg.get("scale") or 1  # post-upsampling models cover whole multiples of the scale
    assert sr.spatial_shape == tuple(n // s * s for n in hr.spatial_shape)
    np.testing.assert_allclose(sr.affine, hr.affine, atol=1e-6)
    assert np.isfinite(sr.data.numpy()).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, saved",
    [
        ("pix2pix", {"model", "discriminator", "optimizer", "d_optimizer"}),
        ("cyclegan", {"model", "network_ba", "d_a", "d_b", "optimizer", "d_optimizer"}),
        ("stargan", {"model", "discriminator", "optimizer", "d_optimizer"}),
        ("funit", {"model", "discriminator", "optimizer", "d_optimizer"}),
    ],
)
def test_gan_bundle_trains_under_ddp(name, saved, tmp_path):
    """multi_gpu_train.json of a GAN bundle, two ranks (gloo on CPU): a paired GAN's G and D are
    DistributedDataParallel; the unpaired steps (CycleGAN, StarGAN, FUNIT) broadcast the weights and
    average the gradients themselves (`GradientSync`). Rank 0 alone checkpoints (every network,
    both optimisers) and logs one MLflow run."""
    from bone3d.tracking import free_port

    bundle = ROOT / "bundles" / name
    datalist = prepare(
        tmp_path / "data", phantoms=4, preset="hrpqct", phantom_shape=(40, 40, 40), progress=False
    )
    models, db = tmp_path / "models", tmp_path / "mlruns.db"
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle",
         "run", *bundle_cli_args(bundle, "train", "3d", "multi_gpu_train"), "--tracking", "mlflow",
         "--bundle_root", str(bundle), "--datalist", str(datalist), "--ckpt_dir", str(models),
         "--output_dir", str(tmp_path / "runs"), "--tracking_uri", f"sqlite:///{db}",
         "--net_preset", "tiny", "--patch_size", "[32,32,32]", "--max_epochs", "2",
         "--val_interval", "2", "--samples_per_volume", "2", "--queue_length", "4"],
        cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert saved <= set(ckpt), set(ckpt)
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(experiment_name(datalist)).experiment_id]
    )
    assert "-ddp-" in run.info.run_name and client.get_metric_history(
        run.info.run_id, "train_loss_d"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "bundle, variant, level",
    [("unet_sr", "3d", "$bone3d.data.datalist.hr_bone_level(@datalist)"), ("rcan", "2p5d", "otsu")],
)
def test_morphometry_loss_overlay_trains(bundle, variant, level, datalist, tmp_path):
    """``common/morphometry_loss_base.json`` listed after a bundle's configs swaps its loss for
    `bone3d.losses.MorphometryLoss` (a post-upsampling 2.5D net: its HR-slice channels are
    separate images) and records the weights in MLflow."""
    b = ROOT / "bundles" / bundle
    models, db = tmp_path / "models", tmp_path / "mlruns.db"
    depth = DEPTH[variant] * (1 if variant == "3d" else _train_config(b).get("scale") or 1)
    _run(
        ["-m", "monai.bundle", "run", *bundle_cli_args(b, "train", variant, "morphometry_loss"),
         "--tracking", "mlflow", "--bundle_root", str(b), "--datalist", str(datalist),
         "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "runs"),
         "--tracking_uri", f"sqlite:///{db}", "--net_preset", "tiny",
         "--patch_size", f"[32,32,{depth}]", "--max_epochs", "2", "--val_interval", "2",
         "--samples_per_volume", "2", "--queue_length", "4", "--loss#threshold", level],
        cwd=tmp_path,
    )  # fmt: skip
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(experiment_name(datalist)).experiment_id]
    )
    assert run.info.run_name.startswith(f"{_train_config(b)['model_name']}-{variant}-morpho-")
    weights = json.loads(run.data.params["morphometry_loss"].replace("'", '"'))
    overlay = json.loads((ROOT / "bundles/common/morphometry_loss_base.json").read_text())
    assert weights == overlay["morphometry_loss"]
    for k in ("morphometry_loss_warmup", "morphometry_loss_pretrain"):
        assert run.data.params[k] == str(overlay[k])
    # the soft-mask level is recorded: each target patch's Otsu level by default, or one level
    # for every patch, the training HR's IsoData level (`hr_bone_level`), when asked
    threshold = run.data.params["morphometry_loss_threshold"]
    assert threshold == ("otsu" if level == "otsu" else str(hr_bone_level(datalist)))
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses and all(np.isfinite(losses))
    # the same settings beside the weights (train_params.json), which `bone3d export` reads
    params = json.loads((models / "train_params.json").read_text())
    assert params["morphometry_loss"] == weights
    assert str(params["morphometry_loss_threshold"]) == threshold
    assert set(params) <= set(run.data.params)  # MLflow adds the engine's epoch_length


@pytest.mark.slow
def test_gan_stage_fine_tunes_a_pretrained_generator_of_another_bundle(datalist, tmp_path):
    """The ESRGAN / SRGAN recipe with pix2pix's paired GAN step: ``--model_name unet
    --pretrained_g`` starts the adversarial stage from a trained unet_sr model; the checkpoint's
    ``data_meta.json`` says which network it holds, so ``bone3d infer`` and ``bone3d export`` of
    the pix2pix bundle rebuild that network (the same output as the unet_sr bundle gives)."""
    from bone3d.export import export_bundle

    unet_b, gan_b = ROOT / "bundles" / "unet_sr", ROOT / "bundles" / "pix2pix"
    common = ["--datalist", str(datalist), "--net_preset", "tiny", "--patch_size", "[32,32,32]",
              "--max_epochs", "1", "--val_interval", "1", "--samples_per_volume", "2",
              "--queue_length", "4"]  # fmt: skip
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    _run(["-m", "monai.bundle", "run", *bundle_cli_args(unet_b, "train", "3d"),
          "--bundle_root", str(unet_b), "--ckpt_dir", str(stage1),
          "--output_dir", str(tmp_path / "runs1"), *common], cwd=tmp_path)  # fmt: skip
    res = _run(
        ["-m", "monai.bundle", "run", *bundle_cli_args(gan_b, "train", "3d"), "--tracking",
         "mlflow", "--tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}", "--bundle_root",
         str(gan_b), "--ckpt_dir", str(stage2), "--output_dir", str(tmp_path / "runs2"),
         "--model_name", "unet", "--pretrained_g", str(stage1 / "model.pt"), *common],
        cwd=tmp_path,
    )  # fmt: skip
    assert f"Restored all variables from {stage1 / 'model.pt'}" in res.stdout + res.stderr
    assert json.loads((stage2 / "data_meta.json").read_text())["model_name"] == "unet"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(experiment_name(datalist)).experiment_id]
    )
    assert run.data.params["pretrained_g"] == str(stage1 / "model.pt")
    assert client.get_metric_history(run.info.run_id, "train_loss_d")
    trained = torch.load(stage2 / "model.pt", weights_only=True)
    started = torch.load(stage1 / "model.pt", weights_only=True)
    assert trained.keys() == started.keys()  # the U-Net, fine-tuned
    assert any(not torch.equal(trained[k], started[k]) for k in trained)

    test = datalist_items(datalist, "test")[0]
    outs = {}
    for b in (gan_b, unet_b):
        outs[b.name] = tmp_path / f"{b.name}.nii.gz"
        args = ["infer", str(b), test["image"], "-o", str(outs[b.name]), "--checkpoint",
                str(stage2 / "model.pt")]  # fmt: skip
        assert bone3d_main(args) == 0
    np.testing.assert_array_equal(
        read_volume(outs["pix2pix"]).data.numpy(), read_volume(outs["unet_sr"]).data.numpy()
    )
    # evaluate.json too builds the checkpoint's network and preset (no --model_name or
    # --net_preset given): the stage's U-Net on the test split
    ev = tmp_path / "eval"
    _run(["-m", "monai.bundle", "run", *bundle_cli_args(gan_b, "train", "evaluate", "3d"),
          "--bundle_root", str(gan_b), "--datalist", str(datalist), "--ckpt_dir", str(stage2),
          "--output_dir", str(ev), "--patch_size", "[32,32,32]"], cwd=tmp_path)  # fmt: skip
    rows = dict(line.split(",") for line in (ev / "metrics.csv").read_text().splitlines())
    assert np.isfinite(float(rows["test_psnr"]))
    zipped = export_bundle(gan_b, tmp_path / "pix2pix.zip", checkpoint=stage2 / "model.pt")
    with zipfile.ZipFile(zipped) as zf:
        cfg = json.loads(zf.read("pix2pix/configs/inference.json"))
    assert cfg["network_def"]["_target_"].startswith("scripts.unet.")
