"""A shared MLflow tracking server on PostgreSQL: ``bone3d tracking-server start|status|stop``.

What a lab runs instead of one ``mlruns.db`` per person: MLflow's own server (``mlflow server``,
uvicorn, one worker) with a PostgreSQL backend store and a local artifact folder it serves itself
(``--artifacts-destination``: clients upload and download artifacts over HTTP, so they need no
access to the server's disk). Nothing here re-implements a server; this module only does the
set-up steps a user would otherwise type:

* ``initdb`` of a private PostgreSQL cluster in ``ROOT/pgdata`` (TCP on 127.0.0.1 only, no Unix
  socket, password authentication with a random password kept in ``ROOT/pgpass``, mode 0600);
  PostgreSQL refuses to run as root, so under root the cluster belongs to the ``postgres`` system
  user (Debian's package creates it) and its commands run through ``runuser``;
* ``pg_ctl start`` and a ``mlflow`` database;
* ``mlflow server`` in its own process group, the backend URI passed in the environment (so the
  password is not on a command line), **job execution disabled**
  (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: MLflow 3 otherwise starts huey job workers that
  outlive a plain kill of the server PID);
* ``ROOT/server.json`` with the PIDs, ports and URI; ``stop`` signals the MLflow process group by
  that PID (SIGTERM, then SIGKILL after a grace period) and stops PostgreSQL with
  ``pg_ctl stop -m fast``, then checks that both PIDs are gone.

The server binds to 127.0.0.1 by default; binding elsewhere exposes an unauthenticated MLflow.
Clients: ``--tracking_uri http://127.0.0.1:PORT`` for a bundle run, ``mlflow.set_tracking_uri``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bone3d.errors import InputError

PG_USER = "bone3d"
PG_DB = "mlflow"


def _pg_bin(tool: str) -> str:
    """Path of a PostgreSQL server program: on PATH, else the newest Debian ``/usr/lib/postgresql``."""
    found = shutil.which(tool)
    if found:
        return found
    cands = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0,
    )
    if not cands:
        raise InputError(
            tool,
            "PostgreSQL server programs not found; install them (Debian: apt-get install postgresql)",
        )
    return cands[-1]


def _as_pg_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL will not run as root: run its programs as the ``postgres`` user there."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0); reap it if it is ours
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise InputError(what, (res.stderr or res.stdout).strip().splitlines()[-1:] or "failed")


def _init_cluster(root: Path, pg_port: int) -> None:
    pgdata = root / "pgdata"
    pgdata.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    pgpass = root / "pgpass"
    pgpass.write_text(password)
    pgpass.chmod(0o600)
    pwfile = pgdata.parent / ".pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(pgdata, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(pgdata)])
        if probe.returncode != 0:
            pwfile.unlink()
            raise InputError(
                root,
                "running as root, PostgreSQL runs as user 'postgres', who cannot reach this folder "
                "(give its parent folders o+x, or choose a folder under /srv or /var/lib)",
            )
    try:
        _run(
            _as_pg_owner(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    PG_USER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            ),
            "initdb",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    conf = (
        "\n# bone3d tracking-server\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {pg_port}\n"
        "unix_socket_directories = ''\n"
    )
    # the cluster belongs to postgres under root: append through a user that may write the file
    cmd = _as_pg_owner(["sh", "-c", f"cat >> '{pgdata / 'postgresql.conf'}'"])
    subprocess.run(cmd, input=conf, text=True, check=True)


def _pg_port(root: Path) -> int:
    for line in (root / "pgdata" / "postgresql.conf").read_text().splitlines()[::-1]:
        if line.startswith("port = "):
            return int(line.split("=")[1])
    raise InputError(root / "pgdata", "no port in postgresql.conf")


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise InputError("mlflow server", "exited at start-up: " + " | ".join(tail))
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise InputError("mlflow server", f"no answer from {url} after {timeout:.0f} s (see {log})")


def start(
    root: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 5000,
    pg_port: int | None = None,
    timeout: float = 240.0,
) -> dict:
    """Start PostgreSQL (creating the cluster on first use) and ``mlflow server``; return the state.

    ``root`` keeps the cluster (``pgdata``), the artifacts (``artifacts``), the logs and
    ``server.json``. A second ``start`` on a running root is refused.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "server.json"
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        if _group_alive(old["mlflow_pid"]):
            raise InputError(root, f"a server already runs here ({old['uri']}); stop it first")
    if not _free(host, port):
        raise InputError("--port", f"{host}:{port} is in use")
    pgdata = root / "pgdata"
    if not (pgdata / "PG_VERSION").is_file():
        if pgdata.exists():
            raise InputError(pgdata, "exists but is not a PostgreSQL cluster")
        _init_cluster(root, pg_port or free_port())
    pg_port = _pg_port(root)
    if _postmaster_pid(pgdata) is None or not _alive(_postmaster_pid(pgdata)):
        if not _free("127.0.0.1", pg_port):
            raise InputError("--pg-port", f"127.0.0.1:{pg_port} is in use")
        _run(
            _as_pg_owner(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(pgdata),
                    "-l",
                    str(pgdata / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            "pg_ctl start",
        )
    password = (root / "pgpass").read_text().strip()
    _ensure_database(pg_port, password)

    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{PG_USER}:{password}@127.0.0.1:{pg_port}/{PG_DB}",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = root / "mlflow.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                "1",
                "--serve-artifacts",
                "--artifacts-destination",
                str(artifacts),
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() signals the whole group
        )
    state = {
        "uri": f"http://{host}:{port}",
        "host": host,
        "port": port,
        "mlflow_pid": proc.pid,
        "pg_port": pg_port,
        "pg_pid": _postmaster_pid(pgdata),
        "pgdata": str(pgdata),
        "artifacts": str(artifacts),
        "backend": f"postgresql://{PG_USER}@127.0.0.1:{pg_port}/{PG_DB}",
        "log": str(log),
    }
    from bone3d.io import write_json

    write_json(state, state_file)
    try:
        _wait_http(
            f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/health", proc, log, timeout
        )
    except InputError:
        stop(root)
        raise
    return state


def _ensure_database(pg_port: int, password: str) -> None:
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1", port=pg_port, user=PG_USER, password=password, dbname="postgres"
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {PG_DB}")
    finally:
        conn.close()


def status(root: str | os.PathLike) -> dict:
    """The saved state plus whether each PID is alive and MLflow answers ``/health``."""
    root = Path(root).resolve()
    state_file = root / "server.json"
    if not state_file.is_file():
        raise InputError(root, "no server.json: no server was started here")
    state = json.loads(state_file.read_text())
    state["mlflow_alive"] = _group_alive(state["mlflow_pid"])
    state["pg_alive"] = state["pg_pid"] is not None and _alive(state["pg_pid"])
    try:
        with urllib.request.urlopen(
            state["uri"].replace("0.0.0.0", "127.0.0.1") + "/health", timeout=2
        ) as r:
            state["healthy"] = r.status == 200
    except OSError:
        state["healthy"] = False
    return state


def stop(root: str | os.PathLike, grace: float = 20.0) -> dict:
    """Stop MLflow (its process group, by the saved PID) and PostgreSQL; return what was stopped."""
    root = Path(root).resolve()
    state_file = root / "server.json"
    if not state_file.is_file():
        raise InputError(root, "no server.json: no server was started here")
    state = json.loads(state_file.read_text())
    pgid = state["mlflow_pid"]
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        t0 = time.monotonic()
        while _group_alive(pgid) and time.monotonic() - t0 < grace:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pgid, os.WNOHANG)
            time.sleep(0.2)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)
    pgdata = Path(state["pgdata"])
    pg_pid = _postmaster_pid(pgdata)
    if pg_pid is not None and _alive(pg_pid):
        _run(
            _as_pg_owner([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        )
        t0 = time.monotonic()  # pg_ctl returns once postmaster.pid is gone; the process follows
        while _alive(pg_pid) and time.monotonic() - t0 < grace:
            time.sleep(0.2)
    stopped = {
        "mlflow_pid": pgid,
        "mlflow_stopped": not _group_alive(pgid),
        "pg_pid": pg_pid,
        "pg_stopped": pg_pid is None or not _alive(pg_pid),
    }
    if stopped["mlflow_stopped"] and stopped["pg_stopped"]:
        state_file.unlink()
    return stopped
