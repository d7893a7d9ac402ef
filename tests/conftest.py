"""Shared fixtures. Tests marked ``realdata`` read ../shared/data (real bone volumes kept outside
this repository); where that folder is absent they are reported as not run, with that reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _share_cores_among_workers() -> None:
    """``pytest -n auto`` starts one pytest-xdist worker per core, and torch gives each worker
    (and each process it starts: bundle runs, torchrun ranks) one OpenMP thread per core, so
    on CI's two cores four threads spin on two. Each worker gets its share of the cores
    instead, passed to its child processes through ``OMP_NUM_THREADS``; a value the user set
    is kept. Timings only: no test reads the thread count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    import torch

    torch.set_num_threads(share)


_share_cores_among_workers()


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
