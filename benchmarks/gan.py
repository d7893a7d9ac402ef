"""Do the GAN bundles learn? A few minutes of 3D training, then a summary of the loss curves.

Runs a GAN bundle (default ``pix2pix``; also ``pix2pixhd``, ``esrgan``, ``r2rcangan`` and the
unpaired ``cyclegan``, ``stargan`` and ``funit``) through
``python -m monai.bundle run`` on generated phantoms with MLflow tracking into a temporary
SQLite store, reads the per-iteration curves back from MLflow and prints, per quarter of the
run: D's loss, G's adversarial and content losses, and D's mean logits on real and generated
patches. It checks that nothing is NaN/inf, that D learns (real and fake logits separate:
``d_real - d_fake > 0`` on average) and that G learns (content loss in the last quarter below the
first; for CycleGAN the cycle-consistency loss, for StarGAN and FUNIT the reconstruction loss),
and exits 1 otherwise.

    .venv/bin/python benchmarks/gan.py [--bundle pix2pix] [--epochs 30] [--preset cpu3d]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", default="pix2pix")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--preset", default="cpu3d")
    ap.add_argument("--phantoms", type=int, default=4)
    args = ap.parse_args()

    import mlflow

    from bone3d.data.datalist import experiment_name
    from bone3d.data.prepare import prepare
    from bone3d.engines import bundle_cli_args

    bundle = ROOT / "bundles" / args.bundle
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datalist = prepare(
            tmp / "data",
            phantoms=args.phantoms + 2,
            preset="hrpqct",
            phantom_shape=(64, 64, 64),
            progress=False,
        )
        db = tmp / "mlruns.db"
        t0 = time.perf_counter()
        res = subprocess.run(
            [
                sys.executable, "-m", "monai.bundle", "run",
                *bundle_cli_args(bundle, "train", "3d"), "--tracking", "mlflow",
                "--bundle_root", str(bundle), "--datalist", str(datalist),
                "--ckpt_dir", str(tmp / "models"), "--output_dir", str(tmp / "runs"),
                "--tracking_uri", f"sqlite:///{db}", "--net_preset", args.preset,
                "--patch_size", "[32,32,32]", "--max_epochs", str(args.epochs),
                "--val_interval", str(args.epochs), "--samples_per_volume", "8",
                "--queue_length", "32", "--batch_size", "4",
            ],
            capture_output=True, text=True, encoding="utf-8",
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stdout[-3000:] + res.stderr[-3000:])
            return 1
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name(experiment_name(datalist))
        (run,) = client.search_runs([exp.experiment_id])
        content_key = {
            "cyclegan": "train_loss_cycle",
            "stargan": "train_loss_rec",
            "funit": "train_loss_rec",
        }.get(args.bundle, "train_loss_g_content")
        keys = ("train_loss_d", "train_loss_g_gan", content_key, "train_d_real", "train_d_fake")
        curves = {
            k: np.array(
                [
                    m.value
                    for m in sorted(
                        client.get_metric_history(run.info.run_id, k), key=lambda m: m.step
                    )
                ]
            )
            for k in keys
        }
        val = {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}
    n = len(curves["train_loss_d"])
    print(
        f"{args.bundle} ({args.preset}, 3D, 32^3 patches, batch 4; G's reconstruction term: "
        f"{content_key.removeprefix('train_')}): {args.epochs} epochs, "
        f"{n} iterations, {wall:.0f} s"
    )
    quarters = np.array_split(np.arange(n), 4)
    print(f"{'quarter':>8} " + " ".join(f"{k.removeprefix('train_'):>15}" for k in keys))
    for i, q in enumerate(quarters, 1):
        print(f"{i:>8} " + " ".join(f"{curves[k][q].mean():>15.4f}" for k in keys))
    print("final validation: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(val.items())))
    finite = all(np.isfinite(c).all() for c in curves.values())
    gap = float(np.mean(curves["train_d_real"] - curves["train_d_fake"]))
    content = curves[content_key]
    g_learns = content[quarters[-1]].mean() < content[quarters[0]].mean()
    print(
        f"finite: {finite}; D separates real from generated (mean d_real - d_fake = {gap:.3f}): "
        f"{gap > 0}; G's reconstruction loss falls (first -> last quarter "
        f"{content[quarters[0]].mean():.4f} -> {content[quarters[-1]].mean():.4f}): {g_learns}"
    )
    return 0 if finite and gap > 0 and g_learns else 1


if __name__ == "__main__":
    sys.exit(main())
