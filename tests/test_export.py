"""``bone3d export``: the zip installs with ``monai.bundle download --url file://`` and runs
inference in a virtual environment that has MONAI and torch but no bone3d, giving the same
volume as ``bone3d infer`` with the same weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bone3d.errors import InputError
from bone3d.export import export_bundle
from bone3d.io import make_image, read_volume, write_volume
from bone3d.nets import TAKES_SCALE, build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory) -> str:
    """A venv whose only packages are this project's pinned wheels, read through a .pth line:
    .pth files inside that folder (bone3d's editable install is one) are not processed, so
    bone3d cannot be imported there."""
    env = tmp_path_factory.mktemp("plainenv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    py = str(env / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "parent_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run(
        [py, "-c", "import importlib.util as u; import monai, torch; print(u.find_spec('bone3d'))"],
        capture_output=True, text=True, cwd=env,
    )  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.strip() == "None", probe.stdout + probe.stderr
    return py


def _io(model: str, variant: str) -> dict:
    slab = {"3d": None, "2d": 0, "2p5d": 2}[variant]
    scale = 2 if model in TAKES_SCALE else None  # post-upsampling models: x2
    return {"in_channels": 1 if slab is None else 2 * slab + 1,
            "out_channels": scale if (scale and slab is not None) else 1, "scale": scale}  # fmt: skip


def _bone3d_infer(*argv: str) -> int:
    """``bone3d infer ARGV`` in this process: the same entry point as the console script, without
    a fresh interpreter's imports of torch and MONAI (seconds per call). Used where the volumes
    it writes are compared with others written in this process; one compared bit for bit with a
    plain-MONAI process's is written by a process too."""
    from bone3d.cli import main

    return main(["infer", *argv])


def _checkpoint(tmp: Path, model: str, variant: str) -> Path:
    torch.manual_seed(0)
    slab = {"3d": None, "2d": 0, "2p5d": 2}[variant]
    dims = 3 if slab is None else 2
    scale = _io(model, variant)["scale"]
    net = build(model, dims, "tiny", **_io(model, variant))
    ckpt = tmp / "models" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt)
    meta = {"lr_range": [-200.0, 1500.0], "hr_range": [-100.0, 1200.0],
            "hr_spacing_mm": [0.05, 0.05, 0.05], "net_preset": "tiny", "spatial_dims": dims,
            "slab": slab, "model_name": model, "variant": variant, "scale": scale}  # fmt: skip
    (ckpt.parent / "data_meta.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize(
    "bundle, model, variant, ensemble",
    [
        ("stargan", "stargan", "2p5d", False),
        ("funit", "funit", "3d", True),
        ("dan", "dan", "3d", False),
        ("rcan", "rcan", "2p5d", True),
    ],
)
def test_exported_bundle_runs_without_bone3d(
    bundle, model, variant, ensemble, plain_python, vb, tmp_path
):
    """``ensemble``: exported with the mirror self-ensemble on, compared with ``bone3d infer
    --self-ensemble``."""
    ckpt = _checkpoint(tmp_path, model, variant)
    rng = np.random.default_rng(0)
    lr = make_image(rng.normal(600, 300, (20, 18, 16)).astype(np.float32), spacing=(0.1,) * 3)
    lr_path = write_volume(lr, tmp_path / "lr.nii.gz")

    zipped = export_bundle(
        ROOT / "bundles" / bundle, tmp_path / "out.zip", variant, ckpt, self_ensemble=ensemble
    )
    # model-zoo conformance of the zip itself (ci/verify_bundle.py; its TorchScript copy too)
    done = vb.verify(zipped, vb.SCHEMA)
    assert done[-2:] == ["TorchScript = eager", "models/model.ts = eager"], done
    names = zipfile.ZipFile(zipped).namelist()
    assert f"{bundle}/configs/inference.json" in names and f"{bundle}/models/model.pt" in names
    assert f"{bundle}/models/model.ts" in names  # MONAI's ckpt_export of the exported network
    cfg = json.loads(zipfile.ZipFile(zipped).read(f"{bundle}/configs/inference.json"))
    assert "bone3d" not in json.dumps(cfg)
    assert cfg["self_ensemble"] is ensemble
    imports = re.compile(r"^\s*(from|import) bone3d", re.MULTILINE)
    assert not any(imports.search(zipfile.ZipFile(zipped).read(n).decode())
                   for n in names if n.endswith(".py"))  # fmt: skip

    work = tmp_path / "plain"
    work.mkdir()
    dl = subprocess.run(
        [plain_python, "-m", "monai.bundle", "download", "--name", bundle,
         "--url", zipped.resolve().as_uri(), "--bundle_dir", str(work / "bundles")],
        capture_output=True, text=True, cwd=work,
    )  # fmt: skip
    assert dl.returncode == 0, dl.stderr[-2000:]
    b = work / "bundles" / bundle
    # MONAI's own checks pass on the exported copy, without bone3d
    ver = subprocess.run(
        [plain_python, "-m", "monai.bundle", "verify_net_in_out", "network_def",
         "--meta_file", str(b / "configs" / "metadata.json"),
         "--config_file", str(b / "configs" / "inference.json"), "--bundle_root", str(b)],
        capture_output=True, text=True, cwd=b,
    )  # fmt: skip
    assert ver.returncode == 0, ver.stdout[-2000:] + ver.stderr[-2000:]
    # the TorchScript copy computes what the trained network does, on the metadata's input shape
    saved = torch.load(ckpt, weights_only=True)
    net = build(model, 3 if variant == "3d" else 2, "tiny", **_io(model, variant)).eval()
    net.load_state_dict(saved)
    spec = json.loads((b / "configs" / "metadata.json").read_text())["network_data_format"]
    x = torch.rand(
        1, spec["inputs"]["image"]["num_channels"], *spec["inputs"]["image"]["spatial_shape"]
    )
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(b / "models" / "model.ts"))(x), net(x))
    exported_state = torch.load(b / "models" / "model.pt", weights_only=True)
    if model == "funit":  # the moving average alone: the trained generator stays behind
        assert not [k for k in exported_state if k.startswith("generator.")]
        assert sum(v.numel() for v in exported_state.values()) < 0.6 * sum(
            v.numel() for v in saved.values()
        )
    else:
        assert exported_state.keys() == saved.keys()
    run = subprocess.run(
        [plain_python, "-m", "monai.bundle", "run",
         "--config_file", str(b / "configs" / "inference.json"),
         "--meta_file", str(b / "configs" / "metadata.json"),
         "--logging_file", str(b / "configs" / "logging.conf"),
         "--bundle_root", str(b), "--input_image", str(lr_path), "--output_dir", str(work / "out")],
        capture_output=True, text=True, cwd=work,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    exported = read_volume(work / "out" / "lr_sr.nii.gz")

    def infer(out: Path, *extra: str, weights: Path = ckpt):
        argv = [str(ROOT / "bundles" / bundle), str(lr_path), "-o", str(out), "--variant", variant,
                "--checkpoint", str(weights), *extra]  # fmt: skip
        assert _bone3d_infer(*argv) == 0
        return read_volume(out)

    ref = infer(tmp_path / "sr.nii.gz", "--self-ensemble" if ensemble else "--no-self-ensemble")
    # the other setting, for switching the exported default below
    other = infer(
        tmp_path / "other.nii.gz", "--no-self-ensemble" if ensemble else "--self-ensemble"
    )
    # the untrained network is not mirror-equivariant: the ensemble changes its output, by more
    # than the tolerance of the comparisons below
    plain = other.data.numpy() if ensemble else ref.data.numpy()
    assert np.abs(other.data.numpy() - ref.data.numpy()).mean() > 0.02 * np.ptp(plain)
    assert exported.spatial_shape == ref.spatial_shape
    np.testing.assert_allclose(exported.affine, ref.affine, atol=1e-3)  # < 2 % of a voxel
    a, e = ref.data.numpy().ravel(), exported.data.numpy().ravel()
    assert np.corrcoef(a, e)[0, 1] > 0.999
    assert np.abs(a - e).mean() < 0.01 * (a.max() - a.min())
    # the exported weights go back into the in-repository bundle (FUNIT's: the averaged
    # generator alone, which is all its inference uses), giving the same volume
    back = infer(
        tmp_path / "back.nii.gz",
        "--self-ensemble" if ensemble else "--no-self-ensemble",
        weights=b / "models" / "model.pt",
    )
    np.testing.assert_array_equal(back.data.numpy(), ref.data.numpy())
    # bone3d infer also runs the exported copy (how benchmarks/results/best_bundle is re-checked)
    again = tmp_path / "again.nii.gz"
    # as a process of its own, as the plain-MONAI run above: bit-identical volumes need the same
    # kernels, and this process's torch state is whatever the tests before left
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "infer", str(b), str(lr_path), "-o", str(again)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(read_volume(again).data.numpy(), exported.data.numpy())
    assert not list(tmp_path.glob(".bone3d-infer-*"))  # its temporary folder is gone
    # ... and switches the exported default (--self-ensemble / --no-self-ensemble)
    switched = tmp_path / "switched.nii.gz"
    flag = "--no-self-ensemble" if ensemble else "--self-ensemble"
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "infer", str(b), str(lr_path), "-o", str(switched), flag],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    a, e = other.data.numpy().ravel(), read_volume(switched).data.numpy().ravel()
    assert np.corrcoef(a, e)[0, 1] > 0.999
    assert np.abs(a - e).mean() < 0.01 * (a.max() - a.min())
    # ... as does MONAI's command line, as the exported README writes it (the word, a string)
    run = subprocess.run(
        [plain_python, "-m", "monai.bundle", "run",
         "--config_file", str(b / "configs" / "inference.json"), "--bundle_root", str(b),
         "--input_image", str(lr_path), "--output_dir", str(work / "switched"),
         "--self_ensemble", "false" if ensemble else "true"],
        capture_output=True, text=True, cwd=work,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    np.testing.assert_array_equal(
        read_volume(work / "switched" / "lr_sr.nii.gz").data.numpy(),
        read_volume(switched).data.numpy(),
    )


@pytest.mark.slow
def test_two_exported_bundles_infer_in_one_process(tmp_path):
    """Every export has a ``scripts`` package of its own: ``bone3d infer`` of one exported
    bundle, then of another, in one process, builds each from its own code (before
    `exported_scripts`, the second resolved ``scripts.rcan`` in the first one's cached
    package and failed), and leaves neither ``scripts`` nor a bundle root on ``sys.path``."""
    rng = np.random.default_rng(0)
    lr = make_image(rng.normal(600, 300, (12, 12, 12)).astype(np.float32), spacing=(0.1,) * 3)
    lr_path = write_volume(lr, tmp_path / "lr.nii.gz")
    path_before = list(sys.path)
    for bundle, model in (("srcnn", "srcnn"), ("rcan", "rcan")):
        ckpt = _checkpoint(tmp_path / bundle, model, "3d")
        zipped = export_bundle(ROOT / "bundles" / bundle, tmp_path / f"{bundle}.zip", "3d", ckpt)
        zipfile.ZipFile(zipped).extractall(tmp_path / "x")
        out = tmp_path / f"{bundle}_sr.nii.gz"
        assert _bone3d_infer(str(tmp_path / "x" / bundle), str(lr_path), "-o", str(out)) == 0
        assert read_volume(out).data.isfinite().all()
        assert not [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]
        assert sys.path == path_before


def test_export_refuses_an_untrained_bundle(tmp_path):
    with pytest.raises(InputError, match="no trained weights"):
        export_bundle(ROOT / "bundles" / "unet_sr", tmp_path / "o.zip", "3d", tmp_path / "none.pt")
    with pytest.raises(InputError, match="no such variant"):
        export_bundle(ROOT / "bundles" / "unet_sr", tmp_path / "o.zip", "4d")
    assert not (tmp_path / "o.zip").exists()


def test_exported_fine_tuning_keeps_the_training_settings(tmp_path, vb):
    """``train_params.json`` (the run's MLflow parameters, written beside the weights when a
    bundle training starts) sets the exported ``train.json``'s loss: a model trained with the
    morphometry loss fine-tunes with its recorded weights, radii and threshold (a regressor term
    dropped), one trained without it by the pixel loss, the loss left one switch away; without
    the file, the shared defaults."""
    from bone3d.export import gan_stage, morphometry_settings, training_params

    overlay = json.loads((ROOT / "bundles/common/morphometry_loss_base.json").read_text())
    ckpt = _checkpoint(tmp_path / "a", "unet", "3d")
    assert training_params(ckpt) is None
    recorded = {"model": "unet", "learning_rate": 1e-3,
                "morphometry_loss": {**overlay["morphometry_loss"], "euler": 0.03,
                                     "regressor": 0.1},
                "morphometry_loss_radii": [2, 12], "morphometry_loss_threshold": 0.42,
                "morphometry_loss_warmup": 7}  # fmt: skip
    (ckpt.parent / "train_params.json").write_text(json.dumps(recorded))

    def exported_train(name: str) -> dict:
        zipped = export_bundle(ROOT / "bundles" / "unet_sr", tmp_path / name, "3d", ckpt)
        return json.loads(zipfile.ZipFile(zipped).read("unet_sr/configs/train.json"))

    cfg = exported_train("morpho.zip")
    # the export unzipped (as benchmarks/results/best_bundle) passes the model-zoo checks too
    zipfile.ZipFile(tmp_path / "morpho.zip").extractall(tmp_path / "x")
    done = vb.verify(tmp_path / "x" / "unet_sr", vb.SCHEMA)
    assert done[0] == "layout" and done[-1] == "models/model.ts = eager", done
    assert cfg["morphometry"] is True and cfg["morphometry_loss_warmup"] == 7
    want = {k: v for k, v in recorded["morphometry_loss"].items() if k != "regressor"}
    assert cfg["morphometry_loss"] == want
    fn = cfg["morphometry_loss_fn"]
    assert (fn["threshold"], fn["thickness_radius"], fn["spacing_radius"]) == (0.42, 2, 12)

    (ckpt.parent / "train_params.json").write_text(json.dumps({"model": "unet"}))
    cfg = exported_train("plain.zip")
    assert cfg["morphometry"] is False  # trained by the pixel loss: fine-tunes so by default
    assert cfg["morphometry_loss"] == overlay["morphometry_loss"]
    assert morphometry_settings(ROOT / "bundles" / "unet_sr")["on"] is True  # no record

    # a paired GAN: its recorded discriminator, loss kind and weights, not the bundle's
    meta = json.loads((ckpt.parent / "data_meta.json").read_text())
    default = gan_stage(ROOT / "bundles" / "pix2pix", "3d", ckpt, meta)
    assert (default["d_name"], default["gan_loss"]) == ("patchgan_d", "vanilla")
    gan = {"discriminator": "nlayer_d", "gan_loss": "lsgan", "conditional": False,
           "loss_weights": {"content": 10.0, "gan": 1.0}}  # fmt: skip
    (ckpt.parent / "train_params.json").write_text(json.dumps(gan))
    trained = gan_stage(ROOT / "bundles" / "pix2pix", "3d", ckpt, meta)
    assert (trained["d_name"], trained["gan_loss"], trained["conditional"]) == (
        "nlayer_d", "lsgan", False)  # fmt: skip
    assert trained["weights"] == {"content": 10.0, "gan": 1.0, "perceptual": 0.0}
    assert trained["args"]["in_channels"] == 1  # unconditional: D sees the output alone

    (ckpt.parent / "train_params.json").write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        training_params(ckpt)


def test_load_weights_takes_what_the_network_holds(tmp_path):
    """A training checkpoint fills the inference-only form; a file of another preset or variant
    is refused by name."""
    from bone3d.nets import build, load_weights

    torch.manual_seed(0)
    full = build("funit", 3, "tiny")
    torch.save(full.state_dict(), tmp_path / "full.pt")
    small = build("funit", 3, "tiny", inference=True)
    assert len(small.state_dict()) < len(full.state_dict())
    loaded = load_weights(small, tmp_path / "full.pt")
    assert loaded.keys() == small.state_dict().keys()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), full.eval()(x))
    # ... and strictly, as MONAI's ckpt_export loads the in-repository bundle's network_def
    again = build("funit", 3, "tiny", inference=True)
    again.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), full(x))
    torch.save(build("unet", 3, "tiny").state_dict(), tmp_path / "unet.pt")
    with pytest.raises(InputError, match="does not fit the network"):
        load_weights(build("unet", 2, "tiny"), tmp_path / "unet.pt")


def _monai_pair(datalist: Path, scale: int, pack: bool) -> dict:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from bone3d.data.datalist import datalist_meta
    from bone3d.engines.plain import PairGridd, datalist_pairs

    meta = datalist_meta(datalist)
    item = datalist_pairs(datalist, "training")[0]
    load = Compose([LoadImaged(["image", "target"], image_only=True), EnsureChannelFirstd(["image", "target"])])  # fmt: skip
    return PairGridd(meta["hr_spacing_mm"], scale=scale, pack=pack)(load(item))


@pytest.mark.parametrize("scale", [None, 2])
def test_monai_pair_grid_is_bone3d_training_grid(phantom_pairs, scale):
    """The exported fine-tuning's MONAI pair (`bone3d.engines.plain.PairGridd`) puts the LR on
    the grid bone3d's TorchIO training uses, with the same values, and packs the same target."""
    from bone3d.data.datalist import datalist_meta
    from bone3d.data.patches import load_subjects, pair_transform

    meta = datalist_meta(phantom_pairs)
    subject = load_subjects(str(phantom_pairs), "training")[0]
    # intensity windows aside (ScaleIntensityRanged in the exported config): the grids alone
    ref = pair_transform({**meta, "lr_range": [0, 1], "hr_range": [0, 1]}, scale=scale)(subject)
    got = _monai_pair(phantom_pairs, scale or 1, pack=True)
    lr_ref, lr_got = ref["image"].data.numpy(), np.asarray(got["image"])
    assert lr_got.shape == lr_ref.shape
    np.testing.assert_allclose(np.asarray(got["image"].affine), ref["image"].affine, atol=1e-6)
    # trilinear both; ITK and torch's grid_sample differ only in float rounding
    np.testing.assert_allclose(lr_got, lr_ref, atol=1e-5 * np.ptp(lr_ref))
    np.testing.assert_array_equal(np.asarray(got["target"]), ref["target"].data.numpy())
    if scale:  # packed: s^3 channels on the LR grid, so one crop cuts both
        assert got["target"].shape == (8, *lr_got.shape[1:])


def test_monai_pair_grid_refuses_bad_pairs(phantom_pairs, tmp_path):
    """Another HR spacing, an LR that does not cover the HR field, NaN: a clear error that
    names the file; nothing is written."""
    from monai.data import MetaTensor

    from bone3d.engines.plain import PairGridd

    got = _monai_pair(phantom_pairs, 1, pack=False)
    lr, hr = got["image"], got["target"]
    before = sorted(p.name for p in Path(phantom_pairs).parent.rglob("*"))
    grid = PairGridd([0.05, 0.05, 0.05])
    with pytest.raises(ValueError, match="not the network's HR spacing"):
        PairGridd([0.04, 0.04, 0.04])({"image": lr, "target": hr})
    shifted = np.array(hr.affine)
    shifted[:3, 3] += 1.0  # 1 mm off: past the LR field
    with pytest.raises(ValueError, match="outside the field of view"):
        grid({"image": lr, "target": MetaTensor(hr.as_tensor(), affine=shifted)})
    bad = lr.clone()
    bad[0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        grid({"image": bad, "target": hr})
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        grid({"image": lr[0], "target": hr})
    assert sorted(p.name for p in Path(phantom_pairs).parent.rglob("*")) == before


def _monai_run(python: str, bundle: Path, config: str, *args: str, cwd: Path):
    res = subprocess.run(
        [python, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / config),
         "--meta_file", str(bundle / "configs" / "metadata.json"),
         "--logging_file", str(bundle / "configs" / "logging.conf"),
         "--bundle_root", str(bundle), *args],
        capture_output=True, text=True, cwd=cwd,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "bundle, model, variant, morphometry",
    [("unet_sr", "unet", "3d", True), ("rcan", "rcan", "2p5d", False)],
)
def test_exported_bundle_fine_tunes_without_bone3d(
    bundle, model, variant, morphometry, phantom_pairs, plain_python, tmp_path
):
    """``configs/train.json`` of an exported bundle trains in plain MONAI on bone3d's datalist:
    the fine-tuned weights reproduce the HR better than the exported ones, a second run resumes
    from the last epoch and ends with an uninterrupted run's weights, the exported weights stay
    untouched, and the inference config runs
    the fine-tuned weights. Pre-upsampling 3D with the morphometry loss; post-upsampling 2.5D
    (x2) with the L1 loss."""
    from bone3d.data.datalist import datalist_meta

    meta = datalist_meta(phantom_pairs)
    ckpt = _checkpoint(tmp_path, model, variant)
    data_meta = json.loads((ckpt.parent / "data_meta.json").read_text())
    data_meta.update(lr_range=meta["lr_range"], hr_range=meta["hr_range"])
    (ckpt.parent / "data_meta.json").write_text(json.dumps(data_meta))
    zipped = export_bundle(ROOT / "bundles" / bundle, tmp_path / "out.zip", variant, ckpt)
    zipfile.ZipFile(zipped).extractall(tmp_path / "x")
    b = tmp_path / "x" / bundle
    train = json.loads((b / "configs" / "train.json").read_text())
    assert "bone3d" not in json.dumps(train)
    metadata = json.loads((b / "configs" / "metadata.json").read_text())
    assert "scikit-image" in metadata["required_packages_version"]  # the morphometry loss's
    from monai.bundle import verify_metadata  # model-zoo conformance of the exported metadata

    schema = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
    verify_metadata(meta_file=str(b / "configs" / "metadata.json"), filepath=str(schema))
    exported = (b / "models" / "model.pt").read_bytes()

    args = ["--datalist", str(phantom_pairs), "--learning_rate", "0.003", "--samples_per_volume", "4",
            "--morphometry", str(morphometry).lower()]  # fmt: skip
    db = tmp_path / "mlruns.db"
    tracking = ["--tracking", "mlflow", "--tracking_uri", f"sqlite:///{db}"] if morphometry else []
    # stopped after epoch 3 (as an interrupted run leaves its checkpoints), then rerun to 6
    log = _monai_run(
        plain_python, b, "train.json", *args, "--max_epochs", "3", *tracking, cwd=tmp_path
    )
    assert "Epoch: 3/3" in log
    if tracking:  # MONAI's own MLflow settings find the trainer and validator by their ids
        import mlflow

        client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
        runs = [
            r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        ]
        assert len(runs) == 1 and {"train_loss", "val_psnr"} <= set(runs[0].data.metrics)
    ft = b / "finetune"
    log = _monai_run(plain_python, b, "train.json", *args, "--max_epochs", "6", cwd=tmp_path)
    assert "Epoch: 6/6" in log and "Epoch: 1/6" not in log  # resumed from epoch 3
    assert (ft / "model.pt").is_file() and (ft / "checkpoint_epoch=6.pt").is_file()
    # and ends with the weights of an uninterrupted run: every epoch's draws are seeded
    whole = tmp_path / "whole"
    _monai_run(plain_python, b, "train.json", *args, "--max_epochs", "6", "--output_dir",
               str(whole), cwd=tmp_path)  # fmt: skip
    resumed, uninterrupted = (
        torch.load(d / "checkpoint_epoch=6.pt", weights_only=True)["model"] for d in (ft, whole)
    )
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert (b / "models" / "model.pt").read_bytes() == exported  # never written
    if morphometry:  # the morphometry terms were on (ramped in from 0 over the warm-up)
        assert train["loss"].startswith("$@morphometry_loss_fn")

    # the fine-tuned network is closer to the HR of the validation pair than the exported one
    val = json.loads(Path(phantom_pairs).read_text())["validation"][0]
    lr_path, hr_path = (Path(phantom_pairs).parent / val[k] for k in ("image", "target"))
    hr = read_volume(hr_path).data.numpy()[0]

    def error(*extra: str) -> float:
        out = tmp_path / f"out{len(extra)}"
        _monai_run(plain_python, b, "inference.json", "--input_image", str(lr_path),
                   "--output_dir", str(out), *extra, cwd=tmp_path)  # fmt: skip
        sr = read_volume(next(out.glob("*_sr.nii.gz"))).data.numpy()[0]
        n = [min(a, c) for a, c in zip(sr.shape, hr.shape, strict=True)]
        return float(np.abs(sr[: n[0], : n[1], : n[2]] - hr[: n[0], : n[1], : n[2]]).mean())

    before, after = error(), error("--ckpt_path", str(ft / "model.pt"))
    assert after < 0.7 * before, (before, after)

    # starting again over an earlier run's checkpoints is refused (a later resume would mix them)
    res = subprocess.run(
        [plain_python, "-m", "monai.bundle", "run", "--config_file", str(b / "configs" / "train.json"),
         "--bundle_root", str(b), *args, "--resume", "false"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode != 0 and "holds checkpoints of an earlier run" in res.stderr
    assert (ft / "checkpoint_epoch=6.pt").is_file()


@pytest.mark.slow
def test_exported_bundle_fine_tunes_on_two_ranks(phantom_pairs, plain_python, tmp_path):
    """``configs/multi_gpu_train.json`` over ``train.json``, launched with torchrun (2 CPU
    processes, gloo), fine-tunes in plain MONAI: rank 0 alone writes checkpoints, the saved
    weights are the plain network's (``inference.json`` runs them), a rerun resumes on both
    ranks, and the exported weights stay untouched."""
    from bone3d.data.datalist import datalist_meta
    from bone3d.tracking import free_port

    meta = datalist_meta(phantom_pairs)
    ckpt = _checkpoint(tmp_path, "unet", "3d")
    data_meta = json.loads((ckpt.parent / "data_meta.json").read_text())
    data_meta.update(lr_range=meta["lr_range"], hr_range=meta["hr_range"])
    (ckpt.parent / "data_meta.json").write_text(json.dumps(data_meta))
    zipped = export_bundle(ROOT / "bundles" / "unet_sr", tmp_path / "out.zip", "3d", ckpt)
    zipfile.ZipFile(zipped).extractall(tmp_path / "x")
    b = tmp_path / "x" / "unet_sr"
    exported = (b / "models" / "model.pt").read_bytes()
    # two training pairs, one per rank: the phantom datalist's training and test pairs
    lists = json.loads(Path(phantom_pairs).read_text())
    here = Path(phantom_pairs).parent
    for pair in lists["training"] + lists["validation"] + lists["test"]:
        pair.update({k: str(here / pair[k]) for k in ("image", "target")})
    lists["training"] = lists["training"] + lists["test"]
    datalist = tmp_path / "two_ranks.json"
    datalist.write_text(json.dumps(lists))
    configs = str([str(b / "configs" / f) for f in ("train.json", "multi_gpu_train.json")])

    def torchrun(epochs: int) -> str:
        res = subprocess.run(
            [plain_python, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={free_port()}", "-m", "monai.bundle", "run", "--config_file", configs,
             "--bundle_root", str(b), "--datalist", str(datalist), "--samples_per_volume", "2",
             "--max_epochs", str(epochs)],
            capture_output=True, text=True, cwd=tmp_path, timeout=400,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    log = torchrun(2)
    assert "Epoch: 2/2" in log
    # one of the two training pairs per rank and epoch (one volume per step): the sampler
    # splits them; train.json alone would step over both in every process
    assert "Iter: 1/1" in log and "Iter: 1/2" not in log, log[-3000:]
    ft = b / "finetune"
    assert sorted(f.name for f in ft.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt"]
    log = torchrun(3)
    assert "Epoch: 3/3" in log and "Epoch: 1/3" not in log  # both ranks resumed
    state = torch.load(ft / "model.pt", weights_only=True)
    fresh = build("unet", 3, "tiny", **_io("unet", "3d")).state_dict()
    assert state.keys() == fresh.keys()  # not DistributedDataParallel's "module." names
    assert (b / "models" / "model.pt").read_bytes() == exported
    val = lists["validation"][0]["image"]
    _monai_run(plain_python, b, "inference.json", "--input_image", val, "--output_dir",
               str(tmp_path / "o"), "--ckpt_path", str(ft / "model.pt"), cwd=tmp_path)  # fmt: skip
    assert len(list((tmp_path / "o").glob("*_sr.nii.gz"))) == 1


@pytest.mark.slow
def test_exported_paired_gan_fine_tunes_adversarially(phantom_pairs, plain_python, tmp_path):
    """A paired GAN's export carries its discriminator: the code in ``scripts/``, the weights of
    the training's last checkpoint in ``models/discriminator.pt``, and bone3d's paired GAN
    step. In plain MONAI ``train.json`` loads that D, trains it with G, checkpoints and resumes
    both; ``--gan false`` fine-tunes G by the loss alone and leaves D as exported."""
    from bone3d.data.datalist import datalist_meta

    meta = datalist_meta(phantom_pairs)
    ckpt = _checkpoint(tmp_path, "pix2pix_g", "3d")
    data_meta = json.loads((ckpt.parent / "data_meta.json").read_text())
    data_meta.update(lr_range=meta["lr_range"], hr_range=meta["hr_range"])
    (ckpt.parent / "data_meta.json").write_text(json.dumps(data_meta))
    torch.manual_seed(1)
    d = build("patchgan_d", 3, "tiny", in_channels=2)  # conditional: cat(LR, image)
    g = torch.load(ckpt, weights_only=True)
    for epoch, scale in ((2, 0.5), (3, 1.0)):  # the last epoch's D is the one exported
        d_state = {k: v * scale for k, v in d.state_dict().items()}
        torch.save({"model": g, "discriminator": d_state},
                   ckpt.parent / f"checkpoint_epoch={epoch}.pt")  # fmt: skip
    zipped = export_bundle(ROOT / "bundles" / "pix2pix", tmp_path / "out.zip", "3d", ckpt)
    zipfile.ZipFile(zipped).extractall(tmp_path / "x")
    b = tmp_path / "x" / "pix2pix"
    exported_d = torch.load(b / "models" / "discriminator.pt", weights_only=True)
    assert all(torch.equal(exported_d[k], v) for k, v in d.state_dict().items())
    train = json.loads((b / "configs" / "train.json").read_text())
    assert "bone3d" not in json.dumps(train) and (b / "scripts" / "gan.py").is_file()
    assert train["gan_weights"]["content"] == 100.0 and train["gan_loss"] == "vanilla"
    overlay = json.loads((b / "configs" / "multi_gpu_train.json").read_text())
    assert overlay["discriminator"]["_target_"].endswith("DistributedDataParallel")
    assert "models/discriminator.pt" in (b / "docs" / "README.md").read_text()

    args = ["--datalist", str(phantom_pairs), "--samples_per_volume", "2", "--morphometry", "false"]
    log = _monai_run(plain_python, b, "train.json", *args, "--max_epochs", "2", cwd=tmp_path)
    assert "discriminator.pt" in log and "Restored all variables" in log
    assert "loss_d" in log and "Epoch: 2/2" in log
    ft = b / "finetune"
    two = torch.load(ft / "checkpoint_epoch=2.pt", weights_only=True)
    assert {"model", "optimizer", "discriminator", "d_optimizer", "trainer"} <= set(two)
    assert any(not torch.equal(two["discriminator"][k], v) for k, v in exported_d.items())
    log = _monai_run(plain_python, b, "train.json", *args, "--max_epochs", "3", cwd=tmp_path)
    assert "Epoch: 3/3" in log and "Epoch: 1/3" not in log  # resumed, D with G
    three = torch.load(ft / "checkpoint_epoch=3.pt", weights_only=True)
    assert any(
        not torch.equal(three["discriminator"][k], v) for k, v in two["discriminator"].items()
    )

    plain_ft = tmp_path / "no_gan"
    log = _monai_run(plain_python, b, "train.json", *args, "--max_epochs", "1", "--gan", "false",
                     "--output_dir", str(plain_ft), cwd=tmp_path)  # fmt: skip
    assert "loss_d" not in log
    one = torch.load(plain_ft / "checkpoint_epoch=1.pt", weights_only=True)
    assert all(torch.equal(one["discriminator"][k], v) for k, v in exported_d.items())
    assert any(not torch.equal(one["model"][k], v) for k, v in g.items())
