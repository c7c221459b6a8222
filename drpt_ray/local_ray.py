"""A local Ray on this machine: the environment it starts with, free ports, and a head in its own
process group that is ended through that group (never `ray stop`, which would end every Ray on the
machine). `drpt-ray serve` starts its Ray here; the control-plane tests and the benches that submit
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


def start_local_ray(dashboard_port: int, num_cpus: int, timeout_s: float = 90.0) -> str:
    """Start a local Ray head with the dashboard (the Jobs API) unless one answers already; returns
    its URL. It outlives this process, so restarting the control plane does not stop running jobs."""
    url = f"http://127.0.0.1:{dashboard_port}"
    if dashboard_up(url):
        print(f"drpt-ray serve: using the local Ray dashboard at {url}")
        return url
    # The agents' default ports (52365, ...) may be held by another Ray on this machine; a busy
    # agent port does not fail `ray start`, it silently disables the Jobs API. Take free ones.
    agent_ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port")}
    cmd = [ray_command(), "start", "--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    cmd += [f"--{flag}={port}" for flag, port in agent_ports.items()]
    print("drpt-ray serve: starting a local Ray:", " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=ray_env())
    if done.returncode != 0:
        raise ValueError(f"`ray start` failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    deadline = time.monotonic() + timeout_s
    while not dashboard_up(url):
        if time.monotonic() > deadline:
            raise ValueError(f"the local Ray started but its dashboard did not answer at {url} "
                             f"within {timeout_s:.0f} s")
        time.sleep(0.5)
    print(f"drpt-ray serve: local Ray up, dashboard {url} (it keeps running after serve exits; `ray stop` ends it)")
    return url


def start_ray_head(num_cpus: int, log: Path, env: Mapping[str, str], cwd: Path | None = None,
                   timeout_s: float = 120.0) -> tuple[subprocess.Popen, str, Path]:
    """`ray start --head --block` with its dashboard (the Jobs API), every port free, in its own
    process group, logging to `log`; waits until the node has started (not just the dashboard: it
    answers before a raylet that may still die). Returns the process, the dashboard URL and Ray's
    temp dir (remove it after `stop_group`). RuntimeError with the log's tail if it exits or times out."""
    # Directly under /tmp, not TMPDIR (a clone's .tmp): Ray's unix socket paths
    # (<temp>/session_<date>_<pid>/sockets/dash_MetricsHead) must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="drptray", dir="/tmp"))
    ports = {flag: free_port() for flag in HEAD_PORT_FLAGS}
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
