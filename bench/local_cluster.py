"""A real control plane on a local Ray head (drpt_ray.local_ray.start_ray_head), for benches that
submit through the REST API (bench/rl_quality.py's sweep). It runs in its own process group and is
ended through it (drpt_ray.local_ray.stop_group).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from drpt_ray.local_ray import free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]


def wait_until(ready, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 120.0) -> None:
    """Poll `ready()` until it is true; if `proc` exits or `timeout_s` passes first, end it and exit
    with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            raise SystemExit(f"{what} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


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
