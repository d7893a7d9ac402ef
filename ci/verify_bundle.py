"""Model-zoo conformance of bone3d bundles: the checks MONAI model-zoo's ``ci/verify_bundle.py``
makes before a bundle is accepted, on bone3d's layout.

    .venv/bin/python ci/verify_bundle.py                      # every bundle under bundles/
    .venv/bin/python ci/verify_bundle.py bundles/rcan out.zip # a bundle folder, an export
    .venv/bin/python ci/verify_bundle.py --since origin/main  # and: changed => version bumped

For each bundle (a folder ``bundles/NAME``, a zip written by ``bone3d export``, or such a zip
unzipped, as ``benchmarks/results/best_bundle``):

1. layout: the MONAI bundle files (``configs/metadata.json``, ``inference.json``, ...; for a
   folder also bone3d's ``2d/2p5d/3d.json``, ``evaluate.json``, ``multi_gpu_train.json``,
   ``logging.conf``, ``docs/README.md``, ``LICENSE``; for an export ``models/model.pt``);
2. version: ``version`` is a key of ``changelog``; with ``--since REF`` (a git revision), a
   bundle whose files, or the shared ``bundles/common``, differ from REF must carry a version
   other than REF's (model-zoo refuses a changed bundle under a released version);
3. metadata: MONAI's ``verify_metadata`` against the schema (``--schema``; by default the
   offline copy ``../shared/monai/meta_schema_20240725.json`` when present, else MONAI fetches
   the metadata's ``schema`` address);
4. network: MONAI's ``verify_net_in_out`` on ``network_def`` (the 3D variant, whose shapes
   ``network_data_format`` states), and the output's spatial shape, which MONAI does not check
   and which carries an SR network's scale;
5. TorchScript: MONAI's ``ckpt_export`` of those weights, loaded back and compared with the
   eager network on the metadata's input shape; an export's own ``models/model.ts`` likewise.

A folder with trained weights (``models/model.pt`` beside its ``data_meta.json``) is checked with
them; an untrained one with freshly initialised weights of its training defaults (model, preset,
scale). Prints one line per check and exits 1 if any bundle fails (each failure says why);
the other bundles are still checked.

Written here because model-zoo's script is tied to that repository's layout (one
``models/<name>`` folder, one ``configs/inference.json``, a ``model_info.json`` of released
versions, pipenv installs); the checks themselves are MONAI's functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
FOLDER_FILES = (
    "configs/metadata.json", "configs/train.json", "configs/inference.json",
    "configs/evaluate.json", "configs/2d.json", "configs/2p5d.json", "configs/3d.json",
    "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE",
)  # fmt: skip
EXPORT_FILES = (
    "configs/metadata.json", "configs/inference.json", "configs/train.json",
    "models/model.pt", "docs/README.md",
)  # fmt: skip


class BundleError(Exception):
    """A check failed; the message says which and why."""


def check_layout(root: Path, exported: bool) -> str:
    missing = [f for f in (EXPORT_FILES if exported else FOLDER_FILES) if not (root / f).is_file()]
    if missing:
        raise BundleError(f"layout: missing {', '.join(missing)}")
    return "layout"


def check_version(root: Path, since: str | None = None, repo: Path = ROOT) -> str:
    """``version`` in ``changelog``; with ``since``, a changed bundle has a new version."""
    try:
        meta = json.loads((root / "configs" / "metadata.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"version: configs/metadata.json is not JSON ({err})") from None
    for key in ("version", "changelog"):
        if key not in meta:
            raise BundleError(f"version: metadata.json has no {key!r}")
    version = meta["version"]
    if version not in meta["changelog"]:
        raise BundleError(f"version: {version} is not a key of the changelog")
    if since is None:
        return f"version {version}"
    try:
        rel = root.resolve().relative_to(repo.resolve())
    except ValueError:
        raise BundleError(f"version: --since compares bundles inside {repo} only") from None
    shared = rel.parent / "common"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    if git("rev-parse", "--verify", "--quiet", f"{since}^{{commit}}").returncode != 0:
        raise BundleError(f"version: {since!r} is not a git revision of {repo}")
    old = git("show", f"{since}:{(rel / 'configs' / 'metadata.json').as_posix()}")
    if old.returncode != 0:  # a bundle new since REF
        return f"version {version} (new since {since})"
    changed = git("diff", "--quiet", since, "--", rel.as_posix(), shared.as_posix()).returncode
    if changed not in (0, 1):
        raise BundleError(f"version: git cannot compare with {since!r}")
    before = json.loads(old.stdout)["version"]
    if changed == 1 and before == version:
        raise BundleError(
            f"version: the bundle (or bundles/common) changed since {since} but its version is "
            f"still {version}; bump it and add a changelog entry"
        )
    return f"version {version} ({'changed' if changed else 'unchanged'} since {since})"


def check_metadata(root: Path, schema: Path | None) -> str:
    from monai.bundle import verify_metadata

    meta = str(root / "configs" / "metadata.json")
    try:
        if schema is not None:
            verify_metadata(meta_file=meta, filepath=str(schema))
        else:
            with tempfile.TemporaryDirectory() as tmp:  # MONAI fetches the schema address
                verify_metadata(meta_file=meta, filepath=str(Path(tmp) / "schema.json"))
    except Exception as err:  # noqa: BLE001 - MONAI raises jsonschema's and URL errors
        raise BundleError(f"metadata: {' '.join(str(err).split())[:400]}") from None
    return "metadata schema"


def _folder_weights(bundle: Path, tmp: Path) -> Path:
    """The folder's trained ``models/`` if it has one, else ``tmp`` holding freshly initialised
    weights of the bundle's training defaults (3D variant) and the ``data_meta.json`` a
    training would write beside them."""
    import torch
    from monai.bundle import ConfigParser

    from bone3d.engines import bundle_configs
    from bone3d.nets import build

    trained = bundle / "models"
    if (trained / "model.pt").is_file() and (trained / "data_meta.json").is_file():
        return trained
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, "train", "3d"))
    model, preset, scale = parser["model_name"], parser["net_preset"], parser.get("scale")
    torch.manual_seed(0)
    net = build(model, 3, preset, scale=scale)
    torch.save(net.state_dict(), tmp / "model.pt")
    meta = {"lr_range": [0.0, 1.0], "hr_range": [0.0, 1.0], "hr_spacing_mm": [0.05] * 3,
            "model_name": model, "net_preset": preset, "spatial_dims": 3, "slab": None,
            "variant": "3d", "scale": scale}  # fmt: skip
    (tmp / "data_meta.json").write_text(json.dumps(meta))
    return tmp


def check_network(root: Path, exported: bool, tmp: Path) -> list[str]:
    """``verify_net_in_out`` and ``ckpt_export`` (TorchScript equal to eager) of ``network_def``."""
    import torch
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    from bone3d.engines import bundle_configs
    from bone3d.nets import load_weights

    meta_file = str(root / "configs" / "metadata.json")
    if exported:
        configs, models, extra = [str(root / "configs" / "inference.json")], root / "models", {}
    else:
        configs = bundle_configs(root, "inference", "3d")
        models = _folder_weights(root, tmp)
        extra = {"ckpt_dir": str(models)}
    common = {"meta_file": meta_file, "config_file": configs, "bundle_root": str(root), **extra}
    try:
        verify_net_in_out(net_id="network_def", **common)
    except Exception as err:  # noqa: BLE001 - MONAI raises ValueError or the network's own
        raise BundleError(f"network in/out: {' '.join(str(err).split())[:400]}") from None
    done = ["network in/out" + ("" if exported or models != tmp else " (initialised weights)")]
    ts = tmp / "verify_model.ts"
    try:
        ckpt_export(
            net_id="network_def", filepath=str(ts), ckpt_file=str(models / "model.pt"), **common
        )
    except Exception as err:  # noqa: BLE001
        raise BundleError(f"TorchScript export: {' '.join(str(err).split())[:400]}") from None
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update({"bundle_root": str(root), **extra})
    net = parser.get_parsed_content("network_def")
    load_weights(net, models / "model.pt")
    fmt = json.loads(Path(meta_file).read_text())["network_data_format"]
    spec, out = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    torch.manual_seed(0)
    x = torch.rand(1, spec["num_channels"], *spec["spatial_shape"])
    scripted = [("TorchScript", ts)]
    if (models / "model.ts").is_file():
        scripted.append(("models/model.ts", models / "model.ts"))
    with torch.no_grad():
        want = net.eval()(x)
        # MONAI checks the output's channels only; for SR the spatial shape (the scale) matters
        stated = (int(out["num_channels"]), *(int(v) for v in out["spatial_shape"]))
        if tuple(want.shape[1:]) != stated:
            raise BundleError(
                f"network in/out: output {tuple(want.shape[1:])} (channels, space) for input "
                f"{tuple(x.shape[1:])}, metadata says {stated}"
            )
        for name, path in scripted:
            got = torch.jit.load(str(path))(x)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise BundleError(f"{name}: its output differs from the network's")
            done.append(f"{name} = eager")
    return done


def verify(path: Path, schema: Path | None, since: str | None = None) -> list[str]:
    """Every check on one bundle folder or exported zip; the passed checks' names, or
    `BundleError` at the first failure."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exported = path.suffix == ".zip"
        if exported:
            try:
                with zipfile.ZipFile(path) as z:
                    z.extractall(tmp / "x")
            except (zipfile.BadZipFile, OSError) as err:
                raise BundleError(f"not a readable zip ({err})") from None
            tops = [p for p in (tmp / "x").iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise BundleError("an exported bundle zip holds one top folder")
            root = tops[0]
        elif (path / "configs").is_dir():
            # a repository bundle sits beside bundles/common; an export unzipped (such as
            # benchmarks/results/best_bundle) has the shared configs merged in and no such sibling
            root, exported = path, not (path.parent / "common").is_dir()
        else:
            raise BundleError("not a bundle (no configs/ folder) nor an exported .zip")
        done = [check_layout(root, exported)]
        done.append(check_version(root, None if exported else since))
        done.append(check_metadata(root, schema))
        from bone3d.export import exported_scripts

        with exported_scripts(root) if exported else contextlib.nullcontext():
            done += check_network(root, exported, tmp)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("bundles", nargs="*", type=Path, help="bundle folders or exported zips")
    ap.add_argument("--since", help="git revision: a bundle changed since it needs a new version")
    ap.add_argument("--schema", type=Path, help="metadata JSON schema (default: offline copy)")
    args = ap.parse_args(argv)
    targets = args.bundles or sorted(
        p for p in (ROOT / "bundles").iterdir() if (p / "configs").is_dir()
    )
    missing = [str(t) for t in targets if not t.exists()]
    if missing:
        ap.error(f"no such bundle folder or zip: {', '.join(missing)}")
    schema = args.schema or (SCHEMA if SCHEMA.is_file() else None)
    if schema is not None and not schema.is_file():
        ap.error(f"--schema {schema}: no such file")
    failed = 0
    for target in targets:
        try:
            done = verify(target, schema, args.since)
        except BundleError as err:
            failed += 1
            print(f"FAIL {target}: {err}")
        else:
            print(f"ok   {target}: {'; '.join(done)}")
    print(f"{len(targets) - failed} of {len(targets)} bundles conform")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
