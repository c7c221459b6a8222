"""A local Ray head (with its dashboard, the Jobs API) and a real control plane on it, for benches
that submit through the REST API (bench/rl_quality.py's sweep). Both run in their own process
group and are ended through it (`stop_group`), never with `ray stop`, which would end every Ray on
the machine. Same recipe as the slow control-plane tests (tests/control_plane/conftest.py).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from drpt_ray.service_cli import dashboard_up

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below Linux's ephemeral range, which Ray's many outgoing connections may take."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def wait_until(ready, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 120.0) -> None:
    """Poll `ready()` until it is true; if `proc` exits or `timeout_s` passes first, end it and exit
    with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            raise SystemExit(f"{what} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def start_ray_head(out: Path, num_cpus: int) -> tuple[subprocess.Popen, str, Path]:
    """`ray start --head --block` with its dashboard and every port chosen free, logging to
    `out / "ray.log"`; returns the process, the dashboard URL and Ray's temp dir (remove it after)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rlqray", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                                      "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                                      "node-manager-port", "object-manager-port")}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = out / "ray.log"
    proc = subprocess.Popen(cmd + [f"--{k}={v}" for k, v in ports.items()], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    wait_until(lambda: "Ray runtime started" in log.read_text() and dashboard_up(url), proc, log, "the local Ray head")
    return proc, url, temp_dir


def start_control_plane(out: Path, ray_url: str, token: str) -> tuple[subprocess.Popen, str]:
    """`python -m services.control_plane` with the Ray Jobs launcher on `ray_url`, a SQLite file and
    run directories under `out`, one run at a time; returns the process and the API's URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DRPT_API_TOKENS=token, RAY_ADDRESS=ray_url, DRPT_PUBLIC_URL=url, DRPT_MAX_RUNNING_JOBS="1",
               DATABASE_URL=f"sqlite:///{(out / 'control_plane.sqlite').resolve()}",
               DRPT_RUNS_DIR=str((out / "api").resolve()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = out / "control_plane.log"
    proc = subprocess.Popen([sys.executable, "-m", "services.control_plane",
                             "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, proc, log, "the control plane")
    return proc, url


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, wait up to `grace_s` for its leader, then SIGKILL whatever of the
    group is left (Ray's daemons drain for up to 30 s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
