"""Shared fixtures. Tests marked ``realdata`` read ../shared/data (real bone volumes kept outside
this repository); where that folder is absent they are reported as not run, with that reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if SHARED_DATA.is_dir():
        return
    reason = f"realdata: {SHARED_DATA} is not present on this machine"
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def phantom_pairs(tmp_path_factory) -> Path:
    """``datalist.json`` of three simulated ``hrpqct`` phantom pairs, 40^3 HR voxels at 50 um
    (LR on its own grid, HR on the HR grid of the LR field), split 1/1/1. Read-only."""
    from bone3d.data.prepare import prepare

    return prepare(
        tmp_path_factory.mktemp("phantom_pairs") / "data",
        phantoms=3,
        preset="hrpqct",
        phantom_shape=(40, 40, 40),
        progress=False,
    )


@pytest.fixture(scope="session")
def vb():
    """``ci/verify_bundle.py`` as a module (``ci/`` holds scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "ci" / "verify_bundle.py"
    spec = importlib.util.spec_from_file_location("verify_bundle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
