"""Training steps and handlers on MONAI/ignite engines."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON atomically (used by bundle configs to store the data windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    return path


def tracking_enabled(save_execute_config) -> bool:
    """True when ``monai.bundle run --tracking mlflow`` patched the config.

    MONAI's tracking patch replaces ``save_execute_config: true`` with the path of the executed
    config it saves; without ``--tracking`` the value stays ``true``. bone3d's parameter logger
    is enabled only then, so untracked runs do not create MLflow runs.
    """
    return save_execute_config is not True
