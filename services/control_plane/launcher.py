"""Runs go to Ray through the Ray Jobs API (`JobSubmissionClient` against the dashboard).

A job becomes `python -m drpt_ray.run --spec spec.json --job-id ID --report-url URL --address auto`,
a sweep `python -m drpt_ray.tune --spec spec.json --sweep-id ID ...`, each run in its own working
directory `DRPT_RUNS_DIR/<id>` on the head node (relative paths in a spec, such as the default
`output_dir`, resolve there). The spec travels in the runtime env (`DRPT_SPEC_JSON`) and the
entrypoint's shell writes it to `spec.json`, so nothing has to share a filesystem with the
control plane. The Ray submission id is the run id: a submit repeated after a crash is recognised
("already exists") instead of starting the run twice.

A job that shipped its working directory (POST /v1/jobs/with-working-dir) has it stored as
`DRPT_RUNS_DIR/<id>/working_dir.zip` by the control plane; the launcher passes that zip as the
runtime env's `working_dir` (Ray's client uploads it with the submission, so the cluster needs no
shared filesystem for it either). Ray starts the driver in its unpacked copy with the copy first on
PYTHONPATH, so the entrypoint stays there (no `cd`): the job's modules import and its relative
data paths resolve in it, while spec.json and `--output-dir` point into the run's own directory.

Ray 2.60 enables token auth on the dashboard by default. The launcher sends
`Authorization: Bearer <token>` with the token from `DRPT_RAY_AUTH_TOKEN`, else `RAY_AUTH_TOKEN`,
else the file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (where `ray start` writes
it); with none of these it sends nothing, which works when the cluster has auth disabled.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from drpt_ray.topology import DRIVER_ENV
from services.control_plane.settings import Settings

log = logging.getLogger("drpt.control_plane")

# Passed to every driver; the control plane's own value wins when it has one.
DRIVER_ENV_DEFAULTS = DRIVER_ENV | {
    # the trainer's (and Tune driver's) ray.init(runtime_env=...) adds to the job's runtime env
    # instead of failing on the keys both set
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
RAY_TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
# Ray answers these while its dashboard agent is still starting: retry, do not fail the run
TRANSIENT = ("No available agent", "try again later", "status code 503", "status code 502")
REQUEST_TIMEOUT_S = 30.0
CAPACITY_TTL_S = 10.0  # how long the cluster's capacity is reused between submissions
WORKING_DIR_ZIP = "working_dir.zip"


class LauncherUnavailable(Exception):
    """Ray cannot be reached (or refuses our credentials): try again later, change nothing."""


@dataclass
class RayState:
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED | MISSING (Ray has no such job)
    message: str | None = None


class Launcher(Protocol):
    def submit(self, run_id: str, kind: str, spec: dict, ingest_token: str) -> str: ...
    def stop(self, ray_job_id: str) -> None: ...
    def status(self, ray_job_id: str) -> RayState: ...
    def logs(self, ray_job_id: str) -> str | None: ...
    def capacity(self) -> dict[str, float] | None: ...  # the cluster's resources in all (None: unknown now)


def ray_auth_token(settings: Settings) -> str | None:
    """The Ray token-auth token, from the first of the sources in the module docstring."""
    if settings.ray_auth_token:
        return settings.ray_auth_token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    if path.is_file():
        return path.read_text().strip() or None
    return None


def shipped_working_dir(settings: Settings, run_id: str) -> Path:
    """Where the control plane keeps the working directory a job shipped (a zip): in the run's own
    directory, a name the submitter does not choose."""
    return settings.runs_dir / run_id / WORKING_DIR_ZIP


def entrypoint(settings: Settings, run_id: str, kind: str, output_dir: str | None = None) -> str:
    """The shell command Ray runs for a job or a sweep. With `output_dir` (a job that shipped its
    working directory) the driver stays in Ray's copy of that directory and writes to `output_dir`
    inside the run's directory; otherwise it runs in the run's directory."""
    workdir = settings.runs_dir / run_id
    module, id_flag = ("drpt_ray.tune", "--sweep-id") if kind == "sweep" else ("drpt_ray.run", "--job-id")
    q = shlex.quote
    spec = q(str(workdir / "spec.json"))
    stay = f" --output-dir {q(str(workdir / output_dir))}" if output_dir else ""
    enter = "" if output_dir else f"cd {q(str(workdir))} && "
    return (
        f"mkdir -p {q(str(workdir))} && {enter}printf '%s' \"$DRPT_SPEC_JSON\" > {spec} && "
        f"exec {q(settings.driver_python)} -m {module} --spec {spec} {id_flag} {q(run_id)} "
        f"--report-url {q(settings.public_url)} --address auto{stay}"
    )


def ray_job(settings: Settings, run_id: str, kind: str, spec: dict, ingest_token: str) -> dict:
    """The Jobs API `submit_job` arguments of a run (see the module docstring)."""
    runtime_env, output_dir = {"env_vars": driver_env(spec, ingest_token)}, None
    if (shipped := shipped_working_dir(settings, run_id)).is_file():
        runtime_env["working_dir"], output_dir = str(shipped), spec["output_dir"]
    return dict(entrypoint=entrypoint(settings, run_id, kind, output_dir), submission_id=run_id,
                runtime_env=runtime_env, metadata={"drpt_run_id": run_id, "drpt_kind": kind}, entrypoint_num_cpus=0)


def driver_env(spec: dict, ingest_token: str) -> dict[str, str]:
    env = {k: os.environ.get(k, v) for k, v in DRIVER_ENV_DEFAULTS.items()}
    env["DRPT_SPEC_JSON"] = json.dumps(spec)
    env["DRPT_INGEST_TOKEN"] = ingest_token
    return env


class RayJobsLauncher:
    """The Ray Jobs API behind the `Launcher` protocol; every call is bounded by REQUEST_TIMEOUT_S."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None
        self._lock = threading.Lock()
        self._capacity: tuple[float, dict[str, float]] | None = None  # (when, resources)

    def _c(self):
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                class _Client(JobSubmissionClient):
                    def _do_request(self, method, endpoint, **kwargs):  # the SDK sets no timeout
                        kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
                        return super()._do_request(method, endpoint, **kwargs)

                token = ray_auth_token(self.settings)
                headers = {"Authorization": f"Bearer {token}"} if token else None
                try:
                    self._client = _Client(self.settings.dashboard_url, headers=headers)
                except Exception as e:  # unreachable, wrong token, not a dashboard
                    raise LauncherUnavailable(_short(e)) from None
            return self._client

    def _call(self, fn, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except (requests.exceptions.RequestException, ConnectionError) as e:
            with self._lock:
                self._client = None  # reconnect (and re-check the version) next time
            raise LauncherUnavailable(_short(e)) from None
        except Exception as e:
            if type(e).__name__ == "AuthenticationError":
                raise LauncherUnavailable(_short(e)) from None
            raise

    def submit(self, run_id: str, kind: str, spec: dict, ingest_token: str) -> str:
        c = self._c()
        try:
            return self._call(c.submit_job, **ray_job(self.settings, run_id, kind, spec, ingest_token))
        except RuntimeError as e:
            if "already exists" in str(e):
                return run_id  # submitted before a crash: the same run, not a second one
            if any(m in str(e) for m in TRANSIENT):
                raise LauncherUnavailable(_short(e)) from None
            raise

    def stop(self, ray_job_id: str) -> None:
        c = self._c()
        try:
            self._call(c.stop_job, ray_job_id)
        except RuntimeError as e:
            if "does not exist" not in str(e):
                raise

    def status(self, ray_job_id: str) -> RayState:
        c = self._c()
        try:
            info = self._call(c.get_job_info, ray_job_id)
        except RuntimeError as e:
            if "does not exist" in str(e):
                return RayState("MISSING", f"Ray has no job {ray_job_id} (was the cluster restarted?)")
            raise
        return RayState(str(info.status.value if hasattr(info.status, "value") else info.status), info.message)

    def logs(self, ray_job_id: str) -> str | None:
        c = self._c()
        try:
            return self._call(c.get_job_logs, ray_job_id)
        except RuntimeError:
            return None

    def capacity(self) -> dict[str, float] | None:
        """The resources of the cluster's alive nodes, summed (Ray's state API), cached for
        CAPACITY_TTL_S; None when Ray cannot say now (admission then checks the operator's limits only).
        Nodes an autoscaler has not started yet are not counted: DRPT_CLUSTER_CAPACITY=false there."""
        import time

        import httpx

        now = time.monotonic()
        if self._capacity is not None and now - self._capacity[0] < CAPACITY_TTL_S:
            return self._capacity[1]
        token = ray_auth_token(self.settings)
        try:
            r = httpx.get(f"{self.settings.dashboard_url}/api/v0/nodes",
                          params={"detail": "1", "limit": "10000"}, timeout=5.0,
                          headers={"Authorization": f"Bearer {token}"} if token else None)
            rows = r.json()["data"]["result"]["result"] if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            rows = None
        if not rows:
            return None
        total: dict[str, float] = {}
        for node in rows:
            if node.get("state") == "ALIVE":
                for k, v in (node.get("resources_total") or {}).items():
                    total[k] = total.get(k, 0.0) + float(v)
        self._capacity = (now, total)
        return total


class DryRunLauncher:
    """Records submissions and runs nothing: every submitted run stays RUNNING until stopped. The
    record is in memory, so after a restart any id counts as RUNNING (nothing ran to be lost)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.submitted: dict[str, str] = {}  # ray job id -> Ray status
        self._lock = threading.Lock()

    def submit(self, run_id: str, kind: str, spec: dict, ingest_token: str) -> str:
        with self._lock:
            self.submitted.setdefault(run_id, "RUNNING")
        return run_id

    def stop(self, ray_job_id: str) -> None:
        with self._lock:
            if ray_job_id in self.submitted:
                self.submitted[ray_job_id] = "STOPPED"

    def status(self, ray_job_id: str) -> RayState:
        with self._lock:
            return RayState(self.submitted.get(ray_job_id, "RUNNING"), "dry-run launcher")

    def logs(self, ray_job_id: str) -> str | None:
        return f"dry-run launcher: nothing ran for {ray_job_id}\n"

    def capacity(self) -> dict[str, float] | None:
        return None  # no cluster: only the operator's limits apply


def make_launcher(settings: Settings) -> Launcher:
    return DryRunLauncher(settings) if settings.launcher == "dry-run" else RayJobsLauncher(settings)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
