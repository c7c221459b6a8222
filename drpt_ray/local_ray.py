"""A local Ray on this machine: the environment it starts with, free ports, and a head in its own
process group that is ended through that group (never `ray stop`, which would end every Ray on the
machine). `drpt-ray serve` (`start_local_ray`), the control-plane tests and the benches that submit
through the REST API start a blocking head with `start_ray_head` and end it with `stop_group`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import httpx

# The control plane's own secrets. Every Ray job driver inherits the environment of the `ray start`
# that began its cluster, so they must not be in it: a driver gets its run's ingest token and the
# settings the launcher passes (services/control_plane/launcher.py driver_env), nothing else.
CONTROL_PLANE_SECRETS = ("DRPT_API_TOKENS", "DRPT_TOKEN", "DRPT_INGEST_SECRET", "DRPT_RAY_AUTH_TOKEN", "DATABASE_URL")

# Every port a head opens; all are chosen free, since a busy agent port does not fail `ray start`,
# it silently disables the Jobs API.
HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                   "object-manager-port")

_TAKEN: set[int] = set()


def ray_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` (this process's) without the control plane's secrets: what a local Ray starts with."""
    return {k: v for k, v in environ.items() if k not in CONTROL_PLANE_SECRETS}


def dashboard_up(url: str) -> bool:
    """A Ray dashboard answers at `url` (401/403: up, with token auth)."""
    try:
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code in (200, 401, 403)
    except httpx.HTTPError:
        return False


def free_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768+), never handed out twice by this process.
    A port from bind(0) is an ephemeral one, which an outgoing connection (Ray's workers make many)
    may take between the choice and the use: a raylet then dies with "Address already in use"."""
    while True:
        port = random.randint(20000, 32000)
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port


def ray_command() -> str:
    """The `ray` executable beside this Python's, else the one on PATH."""
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    if cmd is None:
        raise ValueError("cannot find the `ray` command to start a local Ray; install ray[default] or set RAY_ADDRESS")
    return cmd


@dataclass
class OwnRay:
    """A Ray head this process started (`start_ray_head`), ended through its process group."""

    proc: subprocess.Popen
    url: str
    temp_dir: Path

    def stop(self) -> None:
        stop_group(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(dashboard_port: int, num_cpus: int, log: Path) -> tuple[str, OwnRay | None]:
    """The dashboard URL of a local Ray for `drpt-ray serve`: the one already answering at
    `dashboard_port` (not ours: None), else a head started here (logging to `log`), which the caller
    stops when it is done or leaves running for a later serve to reuse."""
    url = f"http://127.0.0.1:{dashboard_port}"
    if dashboard_up(url):
        print(f"drpt-ray serve: using the local Ray dashboard at {url} (not started here: left running on exit)")
        return url, None
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"drpt-ray serve: starting a local Ray with {num_cpus} CPUs (log {log})", flush=True)
    proc, url, temp_dir = start_ray_head(num_cpus, log, ray_env(), dashboard_port=dashboard_port)
    print(f"drpt-ray serve: local Ray up, dashboard {url} (process group {proc.pid})", flush=True)
    return url, OwnRay(proc, url, temp_dir)


def start_ray_head(num_cpus: int, log: Path, env: Mapping[str, str], cwd: Path | None = None,
                   timeout_s: float = 120.0, dashboard_port: int | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`ray start --head --block` with its dashboard (the Jobs API) at `dashboard_port` and every
    other port free, in its own process group, logging to `log`; waits until the node has started
    (not just the dashboard: it answers before a raylet that may still die). Returns the process,
    the dashboard URL and Ray's temp dir (remove it after `stop_group`). RuntimeError with the log's
    tail if it exits or times out."""
    # Directly under /tmp, not TMPDIR (a clone's .tmp): Ray's unix socket paths
    # (<temp>/session_<date>_<pid>/sockets/dash_MetricsHead) must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="drptray", dir="/tmp"))
    ports = {flag: free_port() for flag in HEAD_PORT_FLAGS}
    if dashboard_port is not None:
        ports["dashboard-port"] = dashboard_port
    cmd = [ray_command(), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd + [f"--{k}={v}" for k, v in ports.items()], cwd=cwd, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + timeout_s
    while not ("Ray runtime started" in log.read_text(errors="replace") and dashboard_up(url)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc, grace_s=3.0)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RuntimeError(f"the local Ray head did not start (exit code {proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc, url, temp_dir


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
