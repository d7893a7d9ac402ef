"""The Dockerfiles install exactly the pinned requirements through the Makefile (parsed, not
built: no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            pins[name.lower()] = version
    return pins


@pytest.mark.parametrize(
    "name, constraints",
    [("Dockerfile", "constraints.txt"), ("Dockerfile.cuda", "docker/constraints-cuda.txt")],
)
def test_dockerfile_installs_the_pins_through_make(name, constraints):
    ins = _instructions(ROOT / "docker" / name)
    runs = " ; ".join(rest for word, rest in ins if word == "RUN")
    copies = " ".join(rest for word, rest in ins if word == "COPY")
    assert "requirements.txt" in copies and "constraints.txt" in copies and "Makefile" in copies
    assert re.search(rf"make venv .*CONSTRAINTS={re.escape(constraints)}", runs), runs
    assert "PYTHON=python3.11" in runs
    # nothing is pip-installed beside the Makefile's pinned path
    assert "pip install" not in runs
    base = next(rest for word, rest in ins if word == "FROM")
    assert "3.11" in base or "python3.11" in runs
    assert (ROOT / constraints).is_file()


def test_constraints_pin_the_same_torch():
    cpu = _pins(ROOT / "constraints.txt")["torch"]
    cuda = _pins(ROOT / "docker" / "constraints-cuda.txt")["torch"]
    req = _pins(ROOT / "requirements.txt")["torch"]
    assert cpu == req + "+cpu" and cuda == req


def test_requirements_are_exact_pins():
    pins = _pins(ROOT / "requirements.txt")
    for pkg in ("torch", "monai", "torchio", "mlflow", "numpy", "scipy", "antspyx"):
        assert pkg in pins


def test_docker_readme_shows_demo_bundle_run_and_ui():
    text = (ROOT / "docker" / "README.md").read_text()
    assert "bone3d.demo" in text and "monai.bundle run" in text and "mlflow ui" in text
