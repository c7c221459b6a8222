"""`drpt-ray serve` as a user starts it, with no RAY_ADDRESS: it starts its own local Ray, a
`drpt-ray run` beside it still works (on a Ray of its own, and says so), and stopping serve stops
the Ray it started (a stray Ray left behind was one of the issue-26 friction points)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from drpt_ray.local_ray import dashboard_up, free_port
from tests.control_plane.conftest import ROOT, TOKEN, wait_for

pytestmark = pytest.mark.slow


def test_a_run_beside_serve_works_and_serve_stops_the_ray_it_started(tmp_path):
    api, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "HOME": str(tmp_path / "home"), "DRPT_API_TOKENS": TOKEN, "RAY_USAGE_STATS_ENABLED": "0",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cp.sqlite'}", "DRPT_RUNS_DIR": str(tmp_path / "runs")}
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "drpt_ray.cli", "serve", "--port", str(api), "--num-cpus", "2",
                              "--ray-dashboard-port", str(dashboard)], cwd=ROOT, env=env, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    ray_group = None
    try:
        def api_up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{api}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return serve.poll() is not None  # died: stop waiting, the asserts below say why
        wait_for(api_up, 240, "drpt-ray serve to answer")
        text = log.read_text()
        assert serve.poll() is None, text
        ray_group = int(text.split("(process group ")[1].split(")")[0])
        assert dashboard_up(f"http://127.0.0.1:{dashboard}")

        spec = tmp_path / "job.yaml"  # a job that needs Ray: the learner as 2 Ray Train workers
        spec.write_text(yaml.safe_dump({
            "mode": "sft", "steps": 2, "eval_every": 100, "batch_size": 4, "data": {"n_general": 40, "n_eval": 8},
            "resources": {"learner_num_workers": 2, "learner_num_cpus": 0.5}, "progress": False,
            "tensorboard": False, "output_dir": str(tmp_path / "run")}))
        run = subprocess.run([sys.executable, "-m", "drpt_ray.cli", "run", str(spec)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        said = run.stdout + run.stderr
        assert run.returncode == 0, said[-3000:]
        assert "Ray: started a local Ray for this run" in said
        assert (tmp_path / "run" / "model").is_dir()
        assert dashboard_up(f"http://127.0.0.1:{dashboard}")  # serve's Ray was left alone by the run

        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
        assert "stopping the local Ray it started" in log.read_text()
        assert not dashboard_up(f"http://127.0.0.1:{dashboard}")
        wait_for(lambda: not group_alive(ray_group), 30, "the Ray head's processes (raylet, GCS, ...) to end")
        ray_group = None
    finally:
        for group in (serve.pid, ray_group):
            if group is not None:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
