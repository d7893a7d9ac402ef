"""``ci/verify_bundle.py``: model-zoo conformance of every bundle, and each check refusing what
it should (a copy of a real bundle, broken one way at a time)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs").is_dir())


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_every_bundle_conforms(bundle, vb):
    """Layout, version in changelog, metadata schema, ``verify_net_in_out`` and a TorchScript
    export equal to the eager network, each bundle with its training defaults' weights."""
    done = vb.verify(bundle, vb.SCHEMA)
    assert done[0] == "layout" and done[2] == "metadata schema"
    assert done[3] == "network in/out (initialised weights)"
    assert done[-1] == "TorchScript = eager"


@pytest.fixture
def copy(tmp_path):
    """A copy of the rcan bundle beside a copy of ``bundles/common``."""
    for name in ("common", "rcan"):
        shutil.copytree(ROOT / "bundles" / name, tmp_path / "bundles" / name)
    return tmp_path / "bundles" / "rcan"


def _edit_meta(bundle: Path, fn) -> None:
    f = bundle / "configs" / "metadata.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta, indent=4))


def test_copy_conforms_and_each_fault_is_named(copy, vb):
    assert vb.verify(copy, vb.SCHEMA)[-1] == "TorchScript = eager"
    (copy / "LICENSE").unlink()
    with pytest.raises(vb.BundleError, match="layout: missing LICENSE"):
        vb.verify(copy, vb.SCHEMA)
    (copy / "LICENSE").write_text("Apache-2.0\n")

    _edit_meta(copy, lambda m: m.update(version="9.9.9"))
    with pytest.raises(vb.BundleError, match="9.9.9 is not a key of the changelog"):
        vb.verify(copy, vb.SCHEMA)
    _edit_meta(copy, lambda m: m["changelog"].update({"9.9.9": "a test version"}))
    assert "version 9.9.9" in vb.verify(copy, vb.SCHEMA)

    _edit_meta(copy, lambda m: m.pop("network_data_format"))
    with pytest.raises(vb.BundleError, match="metadata: .*network_data_format"):
        vb.verify(copy, vb.SCHEMA)
    _edit_meta(copy, lambda m: m.update(network_data_format=json.loads(
        (ROOT / "bundles" / "rcan" / "configs" / "metadata.json").read_text()
    )["network_data_format"]))  # fmt: skip

    # RCAN upsamples x2: an output shape equal to the input's is a wrong description
    _edit_meta(copy, lambda m: m["network_data_format"]["outputs"]["pred"].update(
        spatial_shape=[16, 16, 16]))  # fmt: skip
    with pytest.raises(vb.BundleError, match="network in/out"):
        vb.verify(copy, vb.SCHEMA)


def test_trained_weights_are_the_ones_checked(copy, vb):
    """A folder with ``models/model.pt`` and its ``data_meta.json`` is checked with them: an
    RCAN trained at preset ``tiny`` passes; weights that do not fit the recorded network fail."""
    import torch

    from bone3d.nets import build

    models = copy / "models"
    models.mkdir()
    torch.save(build("rcan", 3, "tiny", scale=2).state_dict(), models / "model.pt")
    meta = {"lr_range": [0, 1], "hr_range": [0, 1], "hr_spacing_mm": [0.05] * 3,
            "model_name": "rcan", "net_preset": "tiny", "spatial_dims": 3, "scale": 2}  # fmt: skip
    (models / "data_meta.json").write_text(json.dumps(meta))
    assert vb.verify(copy, vb.SCHEMA)[3] == "network in/out"
    (models / "data_meta.json").write_text(json.dumps({**meta, "net_preset": "cpu3d"}))
    with pytest.raises(vb.BundleError, match="TorchScript export"):
        vb.verify(copy, vb.SCHEMA)


def test_since_asks_a_changed_bundle_for_a_new_version(copy, vb):
    repo = copy.parents[1]

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    assert vb.check_version(copy, "HEAD", repo=repo).endswith("(unchanged since HEAD)")
    train = copy / "configs" / "train.json"
    train.write_text(train.read_text().replace('"learning_rate": 0.0001', '"learning_rate": 2e-4'))
    with pytest.raises(vb.BundleError, match="changed since HEAD but its version is still"):
        vb.check_version(copy, "HEAD", repo=repo)
    train.write_text(train.read_text().replace("2e-4", "0.0001"))
    shared = copy.parent / "common" / "train_base.json"  # the shared configs count as well
    shared.write_text(shared.read_text().replace('"seed": 0,', '"seed": 1,'))
    with pytest.raises(vb.BundleError, match="changed since HEAD"):
        vb.check_version(copy, "HEAD", repo=repo)
    _edit_meta(copy, lambda m: (m.update(version="5.0.0"), m["changelog"].update({"5.0.0": "x"})))
    assert vb.check_version(copy, "HEAD", repo=repo) == "version 5.0.0 (changed since HEAD)"
    with pytest.raises(vb.BundleError, match="'nosuchref' is not a git revision"):
        vb.check_version(copy, "nosuchref", repo=repo)
    (copy / "configs" / "metadata.json").write_text("{broken")
    with pytest.raises(vb.BundleError, match="metadata.json is not JSON"):
        vb.check_version(copy, "HEAD", repo=repo)


def test_cli_reports_every_bundle_and_exits_1_on_a_failure(copy, vb, tmp_path, capsys):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    assert vb.main([str(copy), str(bad), str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"ok   {copy}: layout; version" in out
    assert f"FAIL {bad}: not a readable zip" in out
    assert f"FAIL {tmp_path}: not a bundle" in out
    assert "1 of 3 bundles conform" in out
    with pytest.raises(SystemExit) as err:  # a path that does not exist: a usage error
        vb.main([str(copy), str(tmp_path / "missing.zip")])
    assert err.value.code == 2
