# bone3d: the two commands. Both create the virtual environment when it is missing.
#   make demo   phantoms -> simulate -> datalist -> train a 3D U-Net -> whole-stack SR -> BV/TV -> MLflow
#   make test   ruff lint + format check, then the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
CONSTRAINTS ?= constraints.txt
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test lint venv clean browser postgres

$(VENV)/.installed: requirements.txt $(CONSTRAINTS) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[bone3d] installing torch first (pinned by $(CONSTRAINTS)), then the pinned requirements"
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps -e .
	$(PIP) check
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed: check constraints.txt" >&2; exit 1; fi
	@touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m bone3d.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# headless Chromium renders the evaluation report in a test; a Debian package, installed with
# apt-get (as root, or through sudo) when it is missing
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "[bone3d] installing headless Chromium (Debian package) for the report test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# PostgreSQL server programs for the `bone3d tracking-server` test (MLflow on a PostgreSQL store);
# the Debian package, installed the same way when missing
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  echo "[bone3d] installing the PostgreSQL server (Debian package) for the tracking-server test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

test: lint browser postgres
	$(PY) -m pytest -n auto --durations=20

clean:
	rm -rf demo mlruns.db bundles/*/models bundles/*/runs .pytest_cache
