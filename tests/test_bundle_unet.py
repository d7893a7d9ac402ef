"""The unet_sr bundle end to end through ``python -m monai.bundle run`` and ``bone3d infer``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from bone3d.data.datalist import datalist_items, experiment_name
from bone3d.data.prepare import prepare
from bone3d.engines import bundle_cli_args, latest_checkpoint
from bone3d.io import read_volume

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "unet_sr"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


def _run(args, cwd):
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_train_then_infer_whole_volume(tmp_path):
    datalist = prepare(
        tmp_path / "data", phantoms=3, preset="hrpqct", phantom_shape=(48, 48, 48), progress=False
    )
    models = tmp_path / "models"
    db = tmp_path / "mlruns.db"
    configs = bundle_cli_args(BUNDLE, "train", "3d")
    _run(
        [
            "-m", "monai.bundle", "run", *configs, "--tracking", "mlflow",
            "--bundle_root", str(BUNDLE), "--datalist", str(datalist), "--ckpt_dir", str(models),
            "--output_dir", str(tmp_path / "runs"), "--tracking_uri", f"sqlite:///{db}",
            "--net_preset", "tiny", "--patch_size", "[32,32,32]", "--max_epochs", "2",
            "--val_interval", "1", "--samples_per_volume", "2", "--queue_length", "4",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert (models / "model.pt").is_file() and (models / "data_meta.json").is_file()

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment_name(datalist))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params = run.data.params
    assert params["model"] == "unet" and params["spatial_dims"] == "3"
    assert params["degradation_preset"] == "hrpqct" and params["patch_size"] == "[32, 32, 32]"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) >= 2 and all(np.isfinite(m.value) for m in losses)
    for key in ("val_psnr", "val_ssim", "val_bvtv_abs_error"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert len(hist) == 2, key
    # artifacts: the executed config and, per validation, a slice figure and the metrics JSON
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "validation/epoch_0002")}
    assert logged == {
        "validation/epoch_0002/validation_slices.png",
        "validation/epoch_0002/validation_metrics.json",
    }
    assert (tmp_path / "runs" / "validation_slices.png").is_file()

    # whole-volume inference through the CLI: HR shape, spacing and affine
    test = datalist_items(datalist, "test")[0]
    out = tmp_path / "sr.nii.gz"
    _run(
        ["-m", "bone3d.cli", "infer", str(BUNDLE), test["image"], "-o", str(out),
         "--checkpoint", str(models / "model.pt")],
        cwd=tmp_path,
    )  # fmt: skip
    sr, hr = read_volume(out), read_volume(test["target"])
    assert sr.spatial_shape == hr.spatial_shape
    np.testing.assert_allclose(sr.spacing, hr.spacing, rtol=1e-6)
    np.testing.assert_allclose(sr.affine, hr.affine, atol=1e-6)
    assert np.isfinite(sr.data.numpy()).all()

    # evaluate.json: the trained model on the held-out test split, summary CSV and an MLflow run
    ev = tmp_path / "eval"
    configs = bundle_cli_args(BUNDLE, "train", "evaluate", "3d")
    _run(
        ["-m", "monai.bundle", "run", *configs, "--tracking", "mlflow",
         "--bundle_root", str(BUNDLE), "--datalist", str(datalist), "--ckpt_dir", str(models),
         "--output_dir", str(ev), "--tracking_uri", f"sqlite:///{db}", "--net_preset", "tiny",
         "--patch_size", "[32,32,32]"],
        cwd=tmp_path,
    )  # fmt: skip
    rows = dict(line.split(",") for line in (ev / "metrics.csv").read_text().splitlines())
    assert set(rows) == {"test_psnr", "test_ssim", "test_bvtv_abs_error"}
    assert all(np.isfinite(float(v)) for v in rows.values())
    eval_runs = [r for r in client.search_runs([exp.experiment_id]) if "-eval-" in r.info.run_name]
    assert len(eval_runs) == 1 and "test_psnr" in eval_runs[0].data.metrics


def test_infer_cli_refuses_bad_input(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume")
    res = subprocess.run(
        [sys.executable, "-m", "bone3d.cli", "infer", str(BUNDLE), str(bad), "-o", str(tmp_path / "o.nii.gz")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "bad.nii.gz" in res.stderr
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL mid-training, run the same command again: it resumes from the last epoch
    checkpoint (model, optimiser, scheduler, trainer state) and continues the same MLflow run."""
    import signal
    import time

    datalist = prepare(
        tmp_path / "data", phantoms=3, preset="hrpqct", phantom_shape=(48, 48, 48), progress=False
    )
    models = tmp_path / "models"
    db = tmp_path / "mlruns.db"
    configs = bundle_cli_args(BUNDLE, "train", "3d")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", *configs, "--tracking", "mlflow",
        "--bundle_root", str(BUNDLE), "--datalist", str(datalist), "--ckpt_dir", str(models),
        "--output_dir", str(tmp_path / "runs"), "--tracking_uri", f"sqlite:///{db}",
        "--net_preset", "tiny", "--patch_size", "[32,32,32]", "--max_epochs", "8",
        "--val_interval", "100", "--samples_per_volume", "2", "--queue_length", "4",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and latest_checkpoint(models) is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(models)
    assert killed_at is not None, "training never saved a checkpoint"
    assert not (models / "checkpoint_final_iteration=8.pt").exists(), "killed too late"
    epoch = int(killed_at.split("epoch=")[1].split(".")[0])
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    log = res.stdout + res.stderr
    assert f"Restored all variables from {killed_at}" in log  # MONAI CheckpointLoader
    assert f"Epoch: {epoch + 1}/8" in log and f"Epoch: {epoch}/8" not in log  # no start-over
    assert (models / "checkpoint_epoch=8.pt").exists()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment_name(datalist))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resumed training must continue the same MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert max(steps) == 8  # one iteration per epoch (1 training specimen x 2 patches, batch 2)

    # the same command never interrupted ends with the same weights, bit for bit: every epoch's
    # data and randomness depend on (seed, epoch) alone (bone3d.engines.EpochSeed)
    fresh = tmp_path / "uninterrupted"
    cmd2 = [c.replace(str(models), str(fresh / "models")).replace(str(db), str(fresh / "db"))
            .replace(str(tmp_path / "runs"), str(fresh / "runs")) for c in cmd]  # fmt: skip
    res = subprocess.run(cmd2, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = torch.load(models / "checkpoint_epoch=8.pt", weights_only=True)["model"]
    straight = torch.load(fresh / "models" / "checkpoint_epoch=8.pt", weights_only=True)["model"]
    assert resumed.keys() == straight.keys()
    for key in resumed:
        assert torch.equal(resumed[key], straight[key]), key


def test_best_model_survives_a_resume(tmp_path):
    """The validation saver keeps model.pt, the best weights by the key metric. A resumed run
    replaces it only with better weights than any earlier validation's; a fresh run's first
    validation always writes it."""
    from ignite.engine import Engine, Events

    from bone3d.engines import atomic_checkpoint_saver

    net = torch.nn.Linear(1, 1, bias=False)

    def validations(scores: list[float], first: int, resume_from=None) -> float:
        """One validation per entry: the network's weight is its number, the PSNR its score;
        returns the weight that model.pt holds after them."""
        engine = Engine(lambda e, batch: None)

        @engine.on(Events.EPOCH_COMPLETED)
        def score(e):
            e.state.metrics["val_psnr"] = scores[e.state.epoch - 1]

        @engine.on(Events.EPOCH_STARTED)
        def weights(e):
            net.weight.data.fill_(first + e.state.epoch - 1)

        atomic_checkpoint_saver(
            save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
            key_metric_name="val_psnr", key_metric_filename="model.pt", resume_from=resume_from,
        ).attach(engine)  # fmt: skip
        engine.run([0], max_epochs=len(scores))
        return float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"])

    assert validations([20.0, 30.0, 25.0], first=1) == 2.0  # the best of three
    resumed = str(tmp_path / "checkpoint_epoch=3.pt")
    assert validations([27.0], first=4, resume_from=resumed) == 2.0  # worse than epoch 2's
    assert validations([31.0], first=5, resume_from=resumed) == 5.0  # better
    assert validations([10.0], first=6) == 6.0  # a fresh run starts its own tracking


def test_resume_restores_the_evaluators_best_and_keeps_an_unrecorded_best(tmp_path):
    """On a MONAI evaluator the record also carries ``best_metric`` and its epoch, so a resumed
    run reports the earlier best, not its own first validation; a ``model.pt`` without a record
    (an older bone3d's) is copied aside before a resume can replace it."""
    from ignite.metrics import Average
    from monai.engines import SupervisedEvaluator

    from bone3d.engines import atomic_checkpoint_saver

    net = torch.nn.Linear(1, 1, bias=False)  # its weight is its output, and the score

    def evaluator(resume_from=None):
        ev = SupervisedEvaluator(
            device=torch.device("cpu"), val_data_loader=[{"image": torch.ones(1, 1)}], network=net,
            key_val_metric={"score": Average(output_transform=lambda out: out[0]["pred"].mean())},
        )  # fmt: skip
        atomic_checkpoint_saver(
            save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
            key_metric_name="score", key_metric_filename="model.pt", resume_from=resume_from,
        ).attach(ev)  # fmt: skip
        return ev

    def validate(ev, weight: float, epoch: int) -> float:
        net.weight.data.fill_(weight)
        ev.run(global_epoch=epoch)
        return float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"])

    ev = evaluator()
    assert [validate(ev, w, e) for e, w in ((1, 1.0), (2, 3.0), (3, 2.0))] == [1.0, 3.0, 3.0]
    assert (ev.state.best_metric, ev.state.best_metric_epoch) == (3.0, 2)
    resumed = str(tmp_path / "checkpoint_epoch=3.pt")
    ev = evaluator(resumed)
    assert validate(ev, 2.5, 4) == 3.0
    assert (ev.state.best_metric, ev.state.best_metric_epoch) == (3.0, 2)  # not epoch 4's 2.5
    assert validate(ev, 4.0, 5) == 4.0 and ev.state.best_metric_epoch == 5

    (tmp_path / "model.key_metric.json").unlink()  # as an older bone3d left its models folder
    with pytest.warns(UserWarning, match="model.before_resume.pt"):
        ev = evaluator(resumed)
    assert validate(ev, 0.5, 6) == 0.5  # its score was unknown, so the resume replaced it ...
    kept = torch.load(tmp_path / "model.before_resume.pt", weights_only=True)["weight"]
    assert float(kept) == 4.0  # ... but the earlier best is kept
    assert not list(tmp_path.glob("*.tmp"))


def test_slab_inferer_sees_the_right_neighbours():
    """A 'network' that returns its first input channel shows which slice each slab starts at."""
    import torch

    from bone3d.inference import SlabInferer

    vol = (
        torch.arange(6, dtype=torch.float32)
        .reshape(1, 1, 1, 1, 6)
        .expand(1, 1, 8, 8, 6)
        .contiguous()
    )
    first = SlabInferer(roi_size=(8, 8), slab=2, slices_per_batch=4)(vol, lambda x: x[:, :1])
    centre = SlabInferer(roi_size=(8, 8), slab=2, slices_per_batch=4)(vol, lambda x: x[:, 2:3])
    assert first[0, 0, 0, 0].tolist() == [0, 0, 0, 1, 2, 3]  # z-2, edge slices repeated
    assert centre[0, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]  # the centre channel is slice z


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(tmp_path):
    """torchrun --nproc_per_node=2 with gloo: ranks train on different specimens (DistributedSampler
    over subjects), validation is shared, rank 0 alone logs to MLflow and saves checkpoints."""
    import json

    from bone3d.tracking import free_port

    datalist = prepare(
        tmp_path / "data", phantoms=4, preset="hrpqct", phantom_shape=(48, 48, 48), progress=False
    )
    assert len(datalist_items(datalist, "training")) == 2
    models, runs, db = tmp_path / "models", tmp_path / "runs", tmp_path / "mlruns.db"
    configs = bundle_cli_args(BUNDLE, "train", "3d", "multi_gpu_train")
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run(
        [
            str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle",
            "run", *configs,
            "--tracking", "mlflow", "--bundle_root", str(BUNDLE), "--datalist", str(datalist),
            "--ckpt_dir", str(models), "--output_dir", str(runs), "--tracking_uri", f"sqlite:///{db}",
            "--net_preset", "tiny", "--patch_size", "[32,32,32]", "--max_epochs", "3",
            "--val_interval", "1", "--samples_per_volume", "2", "--queue_length", "4",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    seen = [
        json.loads((runs / f"specimens_rank{r}.json").read_text())["patches_per_specimen"]
        for r in (0, 1)
    ]
    assert seen[0] != seen[1], seen  # each epoch the two ranks draw different specimens
    assert set(seen[0]) | set(seen[1]) == {
        e["specimen"] for e in datalist_items(datalist, "training")
    }
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment_name(datalist))
    mlruns = client.search_runs([exp.experiment_id])
    assert len(mlruns) == 1 and "-ddp-" in mlruns[0].info.run_name  # rank 0's run, not "rank1"
    assert len(client.get_metric_history(mlruns[0].info.run_id, "val_psnr")) == 3
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=3.pt").is_file()


@pytest.mark.slow
def test_ddp_training_killed_with_sigkill_resumes(tmp_path):
    """torchrun with two gloo ranks, SIGKILL to the whole process group once a checkpoint exists;
    the same command resumes both ranks from rank 0's last checkpoint and continues one MLflow
    run."""
    import contextlib
    import os
    import signal
    import time

    import psutil

    from bone3d.tracking import free_port

    datalist = prepare(
        tmp_path / "data", phantoms=4, preset="hrpqct", phantom_shape=(40, 40, 40), progress=False
    )
    models, runs, db = tmp_path / "models", tmp_path / "runs", tmp_path / "mlruns.db"
    configs = bundle_cli_args(BUNDLE, "train", "3d", "multi_gpu_train")
    torchrun = Path(sys.executable).parent / "torchrun"

    def cmd():
        return [
            str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle",
            "run", *configs, "--tracking", "mlflow", "--bundle_root", str(BUNDLE),
            "--datalist", str(datalist), "--ckpt_dir", str(models), "--output_dir", str(runs),
            "--tracking_uri", f"sqlite:///{db}", "--net_preset", "tiny", "--patch_size", "[24,24,24]",
            "--max_epochs", "8", "--val_interval", "100", "--samples_per_volume", "2",
            "--queue_length", "4",
        ]  # fmt: skip

    proc = subprocess.Popen(
        cmd(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and latest_checkpoint(models) is None:
        time.sleep(0.05)
    # what a scheduler does to a job: SIGKILL to torchrun and both ranks (torchrun puts its
    # workers in their own sessions, so a process-group kill would miss them)
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in family)
    killed_at = latest_checkpoint(models)
    assert killed_at is not None, "training never saved a checkpoint"
    assert not (models / "checkpoint_epoch=8.pt").exists(), "killed too late"
    epoch = int(killed_at.split("epoch=")[1].split(".")[0])
    for ckpt in models.glob("checkpoint_epoch=*.pt"):
        torch.load(ckpt, weights_only=True)  # a temp may remain, never a partial checkpoint

    res = subprocess.run(
        cmd(), cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=400
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    log = res.stdout + res.stderr
    assert log.count(f"Restored all variables from {killed_at}") == 2  # both ranks
    assert f"Epoch: {epoch + 1}/8" in log and f"Epoch: {epoch}/8" not in log
    assert (models / "checkpoint_epoch=8.pt").exists()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment_name(datalist))
    mlruns = client.search_runs([exp.experiment_id])
    assert len(mlruns) == 1 and "-ddp-" in mlruns[0].info.run_name
    steps = [m.step for m in client.get_metric_history(mlruns[0].info.run_id, "train_loss")]
    assert max(steps) == 8
