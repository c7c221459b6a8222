"""Fixtures: a real uvicorn control plane in a subprocess on 127.0.0.1 (ephemeral port, its own
database) and, for the `slow` tests, one real local Ray with its dashboard per session.

The store and API fixtures (`db`, `dry_server`, `server_factory`) run each test twice: on a SQLite
file and on a real PostgreSQL (postgres.py, one server per session, a fresh database per use).

Everything waits with a deadline; a server or Ray that does not come up fails the test with the
tail of its log instead of hanging.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from drpt_ray.client import Client
from drpt_ray.local_ray import free_port
from services.control_plane.db import Database
from tests.control_plane.postgres import PostgresServer, bindir

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
H = {"Authorization": f"Bearer {TOKEN}"}
INGEST_SECRET = "test-ingest-secret-0123456789abcdef"  # every test server's: a test can act as a run's driver


def ingest_token(run_id: str) -> str:
    """The run's ingest token on a test server, as its driver gets it (the only token ingest accepts)."""
    from services.control_plane.security import IngestKeys

    return IngestKeys(INGEST_SECRET).token(run_id)


def ingest_headers(run_id: str) -> dict:
    return {"Authorization": f"Bearer {ingest_token(run_id)}"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Server:
    """One control-plane process; `restart()` brings it back on the same port and database."""

    workdir: Path
    port: int
    env: dict
    proc: subprocess.Popen | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Server":
        self.starts += 1
        log = self.workdir / f"server-{self.starts}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.control_plane", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"],
            cwd=ROOT, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"control plane exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout, "the control plane's /healthz")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> "Server":
        self.kill()
        return self.start()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.logs[-1].read_text(errors="replace").splitlines()[-n:]) if self.logs else ""

    def client(self) -> Client:
        return Client(self.url, TOKEN)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=H, timeout=kw.pop("timeout", 30.0), **kw)


# ----------------------------------------------------------------------------------------------
# databases: SQLite and PostgreSQL

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session. Without Debian's `postgresql` package the Postgres
    half of the suite is skipped, except in CI (`.ci/run` installs it), where that is a failure."""
    bin_dir = bindir()
    if bin_dir is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no PostgreSQL server: apt-get install -y postgresql")
    server = PostgresServer(bin_dir, free_port()).start()
    yield server
    server.stop()


def database_url(request: pytest.FixtureRequest, backend: str, workdir: Path) -> str:
    """A new empty database on `backend`: a SQLite file in `workdir`, or a database on the session's Postgres."""
    if backend == "postgres":
        return request.getfixturevalue("postgres").new_database()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'control_plane.sqlite'}"


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    """The store in this process, on each backend, migrated to head."""
    database = Database(database_url(request, request.param, tmp_path))
    yield database
    database.dispose()


def make_server(workdir: Path, database: str | None = None, **env_extra) -> Server:
    """A control plane on `database` (a URL; default: a SQLite file in `workdir`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "DRPT_API_TOKENS": TOKEN,
        "DRPT_INGEST_SECRET": INGEST_SECRET,
        "DATABASE_URL": database or f"sqlite:///{workdir / 'control_plane.sqlite'}",
        "DRPT_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DRPT_RUNS_DIR": str(workdir / "runs"),
        "DRPT_POLL_INTERVAL_S": "0.3",
        "DRPT_SSE_HEARTBEAT_S": "5",
        "PYTHONPATH": str(ROOT),
    })
    env.update({k: str(v) for k, v in env_extra.items()})
    return Server(workdir, port, env)


@pytest.fixture(params=BACKENDS)
def server_factory(request, tmp_path):
    """Start control planes, each on a new database of the test's backend; each is stopped at the end of the test."""
    made: list[Server] = []

    def factory(name: str = "cp", **env) -> Server:
        s = make_server(tmp_path / name, database_url(request, request.param, tmp_path / name), **env)
        made.append(s)
        return s.start()

    yield factory
    for s in made:
        s.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def dry_server(request, tmp_path_factory):
    """A control plane with the dry-run launcher (nothing runs), shared by a module's fast tests."""
    workdir = tmp_path_factory.mktemp("dry")
    s = make_server(workdir, database_url(request, request.param, workdir), DRPT_LAUNCHER="dry-run",
                    DRPT_MAX_RUNNING_JOBS=2).start()
    yield s
    s.stop()


# ----------------------------------------------------------------------------------------------
# a real local Ray with its dashboard (the Jobs API)


@dataclass
class RayCluster:
    dashboard_url: str
    proc: subprocess.Popen
    log: Path

    def auth_headers(self) -> dict:
        from services.control_plane.launcher import ray_auth_token
        from services.control_plane.settings import Settings

        token = ray_auth_token(Settings(api_tokens=[TOKEN]))
        return {"Authorization": f"Bearer {token}"} if token else {}

    def job_status(self, ray_job_id: str) -> str:
        r = httpx.get(f"{self.dashboard_url}/api/jobs/{ray_job_id}", headers=self.auth_headers(), timeout=10)
        r.raise_for_status()
        return r.json()["status"]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A blocking local Ray head in its own process group (drpt_ray.local_ray.start_ray_head), ended
    through that group at the end (never `ray stop`, which would end other users' clusters)."""
    from drpt_ray.local_ray import ray_env, start_ray_head, stop_group

    # As `drpt-ray serve` starts its Ray: from an environment holding the control plane's secrets,
    # through the filter it uses (test_ray_jobs checks that no job driver sees them).
    env = ray_env(dict(os.environ, RAY_USAGE_STATS_ENABLED="0", DRPT_API_TOKENS=TOKEN, DRPT_INGEST_SECRET=INGEST_SECRET,
                       DATABASE_URL="sqlite:////nonexistent/leaked.sqlite"))
    for attempt in range(3):  # a start that fails (a port taken after all) is retried on fresh ports
        log = tmp_path_factory.mktemp("ray") / "ray.log"
        try:
            proc, url, temp_dir = start_ray_head(4, log, env, cwd=ROOT)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield RayCluster(url, proc, log)
    finally:
        stop_group(proc, grace_s=3.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
