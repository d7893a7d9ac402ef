"""Training steps and handlers on MONAI/ignite engines."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bone3d.engines.plain import EpochSeed, atomic_checkpoint_saver, latest_checkpoint  # noqa: F401
from bone3d.io import write_figure
from bone3d.io import write_json as save_json  # noqa: E402 - the name bundle configs call


def bundle_configs(bundle: str | os.PathLike, *names: str) -> list[str]:
    """Config files for ``python -m monai.bundle run --config_file`` in merge order.

    For each name (``train``, ``inference``, ``evaluate``, ``multi_gpu_train``, a variant such
    as ``3d``): ``bundles/common/<name>_base.json`` when the bundle sits beside that shared folder, then
    the bundle's own ``configs/<name>.json`` when it has one. Later files override earlier keys
    (MONAI's rule), so a bundle states only what differs from the shared pipeline. An exported
    bundle (``bone3d export``) has the shared pieces merged in and needs no ``common``.
    """
    bundle = Path(bundle)
    files = []
    for name in names:
        for f in (
            bundle.parent / "common" / f"{name}_base.json",
            bundle / "configs" / f"{name}.json",
        ):
            if f.is_file():
                files.append(str(f))
    return files


def bundle_files(bundle: str | os.PathLike, *names: str) -> dict:
    """``config_file`` (`bundle_configs`), ``meta_file`` and ``logging_file`` for ``monai.bundle
    run``. MONAI would look for the last two beside the *first* config file (the shared one),
    so they are named explicitly, as MONAI model-zoo commands do."""
    bundle = Path(bundle)
    return {
        "config_file": bundle_configs(bundle, *names),
        "meta_file": str(bundle / "configs" / "metadata.json"),
        "logging_file": str(bundle / "configs" / "logging.conf"),
    }


def bundle_cli_args(bundle: str | os.PathLike, *names: str) -> list[str]:
    """`bundle_files` as ``python -m monai.bundle run`` arguments."""
    f = bundle_files(bundle, *names)
    return [
        "--config_file",
        str(f["config_file"]),
        "--meta_file",
        f["meta_file"],
        "--logging_file",
        f["logging_file"],
    ]


def tracking_enabled(save_execute_config) -> bool:
    """True when ``monai.bundle run --tracking mlflow`` patched the config.

    MONAI's tracking patch replaces ``save_execute_config: true`` with the path of the executed
    config it saves; without ``--tracking`` the value stays ``true``. bone3d's parameter logger
    is enabled only then, so untracked runs do not create MLflow runs.
    """
    return save_execute_config is not True


def resume_state(ckpt_dir: str | os.PathLike, resume: bool) -> str | None:
    """Checkpoint to resume from: the latest one when ``resume`` is true, else None (and the
    stale resume bookkeeping of an earlier training is dropped)."""
    if not resume:
        (Path(ckpt_dir) / "run.json").unlink(missing_ok=True)
        return None
    return latest_checkpoint(ckpt_dir)


def run_name(ckpt_dir: str | os.PathLike, prefix: str, resume_from: str | None) -> str:
    """MLflow run name: the interrupted training's name when resuming (so the same MLflow run
    continues), else a new timestamped name, remembered in ``ckpt_dir/run.json``."""
    import time

    path = Path(ckpt_dir) / "run.json"
    if resume_from is not None and path.is_file():
        try:
            return json.loads(path.read_text())["run_name"]
        except (ValueError, KeyError):
            pass
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    save_json({"run_name": name}, path)
    return name


class SpecimenLog:
    """Ignite handler that records which specimens' patches each process trained on
    (``output_dir/specimens_rank{R}.json``, written atomically at the end of training): the
    provenance of a run, and the check that distributed ranks see different data."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.counts: dict[str, int] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _record(self, engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]  # MONAI may decollate the batch
        for item in items:
            if not isinstance(item, dict) or "specimen" not in item:
                continue
            ids = item["specimen"]
            for sid in [ids] if isinstance(ids, str) else ids:
                self.counts[str(sid)] = self.counts.get(str(sid), 0) + 1

    def _write(self, engine) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        save_json(
            {"rank": rank, "patches_per_specimen": self.counts},
            self.output_dir / f"specimens_rank{rank}.json",
        )


class ValidationArtifacts:
    """Attach to the trainer: after each validation, save a PNG of the middle slices of the last
    validation volume (LR input on the HR grid | prediction | HR) and the validation metrics as
    JSON in ``output_dir``; when MLflow tracking is on, log both as artifacts of the run.

    ``evaluator`` is the validation engine; ``tracking_uri``/``experiment_name``/``run_name``
    identify the MLflow run the bundle's MLflow handlers write to.
    """

    def __init__(
        self,
        evaluator,
        output_dir,
        tracking_uri=None,
        experiment_name=None,
        run_name=None,
        enabled_tracking: bool = False,
    ):
        self.evaluator = evaluator
        self.output_dir = Path(output_dir)
        self.tracking = (tracking_uri, experiment_name, run_name) if enabled_tracking else None
        self.last = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._keep)
        self.evaluator.add_event_handler(Events.COMPLETED, self._save)

    def _keep(self, evaluator) -> None:
        out = evaluator.state.output
        item = out[0] if isinstance(out, list) else out
        if isinstance(item, dict) and all(k in item for k in ("image", "pred", "label")):
            self.last = {
                k: item[k].detach().cpu().float().numpy() for k in ("image", "pred", "label")
            }

    def _save(self, evaluator) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        if self.last is None:
            return
        epoch = int(getattr(evaluator.state, "epoch", 0))
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        for ax, (title, key) in zip(
            axes, [("LR (input)", "image"), ("SR", "pred"), ("HR", "label")], strict=True
        ):
            vol = np.squeeze(self.last[key])
            sl = vol[:, :, vol.shape[2] // 2] if vol.ndim == 3 else vol
            ax.imshow(sl.T, cmap="gray", vmin=0, vmax=1, origin="lower")
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        png = write_figure(fig, self.output_dir / "validation_slices.png")
        metrics = save_json(
            {
                k: float(v)
                for k, v in evaluator.state.metrics.items()
                if isinstance(v, (int, float))
            },
            self.output_dir / "validation_metrics.json",
        )
        if self.tracking is not None:
            import mlflow

            uri, exp_name, run_name = self.tracking
            client = mlflow.MlflowClient(uri)
            exp = client.get_experiment_by_name(exp_name)
            runs = (
                []
                if exp is None
                else client.search_runs(
                    [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
                )
            )
            if runs:
                client.log_artifact(
                    runs[0].info.run_id, str(png), artifact_path=f"validation/epoch_{epoch:04d}"
                )
                client.log_artifact(
                    runs[0].info.run_id, str(metrics), artifact_path=f"validation/epoch_{epoch:04d}"
                )
