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
    bundle, model, variant, ensemble, plain_python, tmp_path
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

    def infer(out: Path, *extra: str):
        res = subprocess.run(
            [sys.executable, "-m", "bone3d.cli", "infer", str(ROOT / "bundles" / bundle),
             str(lr_path), "-o", str(out), "--variant", variant, "--checkpoint", str(ckpt), *extra],
            capture_output=True, text=True,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
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
    # bone3d infer also runs the exported copy (how benchmarks/results/best_bundle is re-checked)
    again = tmp_path / "again.nii.gz"
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


def test_export_refuses_an_untrained_bundle(tmp_path):
    with pytest.raises(InputError, match="no trained weights"):
        export_bundle(ROOT / "bundles" / "unet_sr", tmp_path / "o.zip", "3d", tmp_path / "none.pt")
    with pytest.raises(InputError, match="no such variant"):
        export_bundle(ROOT / "bundles" / "unet_sr", tmp_path / "o.zip", "4d")
    assert not (tmp_path / "o.zip").exists()
