"""``bone3d tracking-server``: MLflow on PostgreSQL, a bundle run logged to it, read back by REST.

Needs the PostgreSQL server programs (Debian ``postgresql``), which ``make test`` installs when
they are missing, like Chromium for the report screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bone3d import tracking
from bone3d.data.datalist import experiment_name
from bone3d.data.prepare import prepare
from bone3d.engines import bundle_cli_args
from bone3d.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "unet_sr"


def _get(uri: str, endpoint: str, **query) -> dict:
    url = f"{uri}{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(uri: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{uri}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def server_root():
    # under root PostgreSQL runs as user 'postgres', who must be able to reach the folder:
    # pytest's tmp_path lives in a 0700 folder, so use a fresh 0755 one under /tmp
    root = Path(tempfile.mkdtemp(prefix="bone3d-mlflow-"))
    root.chmod(0o755)
    yield root / "srv"
    if (root / "srv" / "server.json").is_file():
        tracking.stop(root / "srv")
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_bundle_run_logs_to_postgres_backed_server(server_root, tmp_path):
    port = tracking.free_port()
    state = tracking.start(server_root, port=port)
    uri = state["uri"]
    assert state["host"] == "127.0.0.1" and state["backend"].startswith("postgresql://")
    assert tracking.status(server_root)["healthy"]
    # a second server on the same root is refused, with the reason
    with pytest.raises(InputError, match="already runs here"):
        tracking.start(server_root, port=tracking.free_port())

    datalist = prepare(
        tmp_path / "data", phantoms=3, preset="hrpqct", phantom_shape=(40, 40, 40), progress=False
    )
    configs = bundle_cli_args(BUNDLE, "train", "3d")
    res = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "run", *configs,
            "--tracking", "mlflow", "--tracking_uri", uri, "--bundle_root", str(BUNDLE),
            "--datalist", str(datalist), "--ckpt_dir", str(tmp_path / "models"),
            "--output_dir", str(tmp_path / "runs"), "--net_preset", "tiny",
            "--patch_size", "[24,24,24]", "--max_epochs", "1", "--val_interval", "1",
            "--samples_per_volume", "2", "--queue_length", "4",
        ],
        cwd=tmp_path, capture_output=True, text=True, encoding="utf-8",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # read it back through MLflow's REST API only
    exp = _get(
        uri,
        "/api/2.0/mlflow/experiments/get-by-name",
        experiment_name=experiment_name(datalist),
    )["experiment"]
    runs = _post(uri, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})
    assert len(runs["runs"]) == 1
    run = runs["runs"][0]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model"] == "unet" and params["degradation_preset"] == "hrpqct"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"train_loss", "val_psnr", "val_ssim", "val_bvtv_abs_error"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    run_id = run["info"]["run_id"]
    listed = _get(
        uri, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="validation/epoch_0001"
    )
    names = {f["path"] for f in listed["files"]}
    assert "validation/epoch_0001/validation_slices.png" in names
    # the artifacts went over HTTP into the server's own artifact folder
    assert list(Path(state["artifacts"]).rglob("validation_slices.png"))

    stopped = tracking.stop(server_root)
    assert stopped["mlflow_stopped"] and stopped["pg_stopped"]
    assert not _processes_mentioning(str(server_root)), "server processes outlived stop"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    assert not (server_root / "server.json").exists()


def test_cli_refuses_a_port_in_use(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "bone3d.cli", "tracking-server", "start", "--root",
             str(tmp_path / "srv"), "--port", str(port)],
            capture_output=True, text=True, encoding="utf-8",
        )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"bone3d tracking-server: error: --port: 127.0.0.1:{port} is in use"
    ]
    assert not (tmp_path / "srv" / "pgdata").exists()
