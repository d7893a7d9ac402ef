"""Streaming whole-stack inference: same result as in memory, nothing at the output path until
complete."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from bone3d.data.phantom import make_phantom
from bone3d.data.simulate import degrade
from bone3d.inference import FlipEnsemble, SlabInferer, VolumePredictor
from bone3d.io import read_volume, write_volume
from bone3d.nets import build

META = {"lr_range": [-280, 1680], "hr_range": [-200, 1200], "hr_spacing_mm": [0.05] * 3}


@pytest.fixture(scope="module")
def lr_path(tmp_path_factory):
    ph = make_phantom(shape=(48, 48, 80), seed=1)
    return write_volume(
        degrade(ph.image, "hrpqct").image, tmp_path_factory.mktemp("lr") / "lr.nii.gz"
    )


@pytest.mark.parametrize(
    "mode, ensemble", [("3d", False), ("2p5d", False), ("3d", True), ("2p5d", True)]
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_streamed_equals_in_memory(tmp_path, lr_path, mode, ensemble, suffix):
    """Also with the mirror self-ensemble around the network (3D streaming calls it per window)."""
    torch.manual_seed(0)
    if mode == "3d":
        net = build("unet", 3, "tiny").eval()
        inferer = SlidingWindowInferer(
            roi_size=[32, 32, 32], sw_batch_size=4, overlap=0.25, mode="gaussian"
        )
    else:
        net = build("unet", 2, "tiny", in_channels=5).eval()
        inferer = SlabInferer(roi_size=[32, 32], slab=2)
    if ensemble:
        net = FlipEnsemble(net).eval()
    whole = VolumePredictor(net, inferer, META, stream_voxels=10**12).run(
        lr_path, tmp_path / f"whole{suffix}"
    )
    streamed = VolumePredictor(net, inferer, META, stream_voxels=0, chunk=16).run(
        lr_path, tmp_path / f"stream{suffix}"
    )
    a, b = read_volume(whole), read_volume(streamed)
    assert a.spatial_shape == b.spatial_shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    np.testing.assert_allclose(
        b.data.numpy(), a.data.numpy(), atol=1e-2 * float(np.ptp(a.data.numpy())) / 1000
    )
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_killed_streaming_leaves_no_output(tmp_path):
    ph = make_phantom(shape=(64, 64, 160), seed=2)
    lr = write_volume(degrade(ph.image, "hrpqct").image, tmp_path / "lr.nii.gz")
    out = tmp_path / "sr.nii.gz"
    code = (
        "import torch; from monai.inferers import SlidingWindowInferer;"
        "from bone3d.nets import build; from bone3d.inference import VolumePredictor;"
        f"net = build('unet', 3, 'cpu3d').eval();"
        "inf = SlidingWindowInferer(roi_size=[32, 32, 32], sw_batch_size=1, overlap=0.5);"
        f"VolumePredictor(net, inf, {META!r}, stream_voxels=0, chunk=8).run({str(lr)!r}, {str(out)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(".part" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the slabs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must leave nothing at the output path"
    parts = [p for p in tmp_path.iterdir() if ".part" in p.name]
    assert parts and all(p.name.startswith(".sr.nii.gz.") for p in parts)  # only a removable temp
