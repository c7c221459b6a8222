"""`/v1/jobs`: submit, list, get, cancel, metrics history, logs, artifacts (SSE: routes/events.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response
from sqlalchemy import func, select

from drpt_ray.config import JobSpec
from services.control_plane.strict_json import StrictJSONRoute
from services.control_plane import store
from services.control_plane.db import Event, Job
from services.control_plane.deps import (ApiAuth, CallerDep, DbDep, IdempotencyKeyDep, LauncherDep, OffsetQuery,
                                         SettingsDep, SupervisorDep)
from services.control_plane.errors import errors
from services.control_plane.idempotency import create_once
from services.control_plane.launcher import LauncherUnavailable, shipped_working_dir
from drpt_ray.wire import (Artifacts, ArtifactFile, JobPage, JobPublic, JobWithWorkingDir, MetricsPage, SamplesPage,
                           State)
from services.control_plane.public import job_public
from services.control_plane.admission import admit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[ApiAuth], route_class=StrictJSONRoute)
MAX_LISTED_FILES = 2000


@router.post("", status_code=201, summary="Submit a job (body: a JobSpec)")
def submit_job(spec: JobSpec, db: DbDep, supervisor: SupervisorDep, key: IdempotencyKeyDep, settings: SettingsDep,
               caller: CallerDep) -> JobPublic:
    """Record the job (QUEUED) and return at once; the supervisor submits it to Ray when a slot is free."""
    admit_job(spec, settings, supervisor.launcher)
    return _record(spec, spec.model_dump(mode="json"), None, db, supervisor, key, settings, caller)


@router.post("/with-working-dir", status_code=201, summary="Submit a job with the directory it runs in")
def submit_job_with_working_dir(body: JobWithWorkingDir, db: DbDep, supervisor: SupervisorDep, key: IdempotencyKeyDep,
                                settings: SettingsDep, caller: CallerDep) -> JobPublic:
    """As `POST /v1/jobs`, plus a zip of the job's working directory, which ships to Ray with the job:
    the driver runs in it, its modules are importable (a `module:function` still needs the operator's
    DRPT_USER_CODE_MODULES) and the spec's relative model, data and reward-model paths must name files
    in it. Refused (422) unless the operator sets DRPT_WORKING_DIR_MAX_BYTES, and above it."""
    admit_job(body.spec, settings, supervisor.launcher, body.working_dir)
    # the zip's digest, not the zip, decides whether a retry under the same Idempotency-Key is the same request
    digest = hashlib.sha256(body.working_dir).hexdigest()
    fingerprint = {"spec": body.spec.model_dump(mode="json"), "working_dir": digest}
    return _record(body.spec, fingerprint, body.working_dir, db, supervisor, key, settings, caller)


def _record(spec: JobSpec, fingerprint: dict, working_dir: bytes | None, db, supervisor, key, settings,
            caller) -> JobPublic:
    """Record the job QUEUED (with its working directory, if any) once per idempotency key, and wake the supervisor."""
    def create(s):
        job = store.create(s, "job", spec.model_dump(mode="json"), spec.name, mode=spec.mode, tenant=caller.tenant)
        if working_dir is not None:
            # before the row commits, so the supervisor never sees the job without it (a rollback
            # after this leaves a directory for an id that was never recorded, and nothing reads it)
            path = shipped_working_dir(settings, job.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(working_dir)
        return job_public(job), f"/v1/jobs/{job.id}"

    response = create_once(db, key, fingerprint, create)
    supervisor.wake()
    return response


@router.get("", summary="List jobs, newest first")
def list_jobs(db: DbDep, caller: CallerDep, state: State | None = None, limit: int = Query(50, ge=1, le=500),
              offset: OffsetQuery = 0) -> JobPage:
    with db.read() as s:
        items, total = store.list_runs(s, Job, state, limit, offset, scope=caller.scope)
        return JobPage(items=[job_public(j) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", summary="One job", responses=errors(404))
def get_job(job_id: str, db: DbDep, caller: CallerDep) -> JobPublic:
    with db.read() as s:
        return job_public(store.get_run(s, job_id, kind="job", scope=caller.scope))


@router.post("/{job_id}/cancel", summary="Cancel a job (its Ray job is stopped)", responses=errors(404, 409))
def cancel_job(job_id: str, supervisor: SupervisorDep, caller: CallerDep) -> JobPublic:
    return job_public(supervisor.cancel(job_id, "job", caller.scope))


@router.get("/{job_id}/metrics", summary="Metrics history, one item per reported step, paged", responses=errors(404))
def job_metrics(job_id: str, db: DbDep, caller: CallerDep, limit: int = Query(1000, ge=1, le=10000),
                offset: OffsetQuery = 0) -> MetricsPage:
    with db.read() as s:
        store.get_run(s, job_id, kind="job", scope=caller.scope)
        where = (Event.run_id == job_id, Event.type == "metrics")
        total = s.scalar(select(func.count()).select_from(Event).where(*where))
        rows = s.scalars(select(Event.data).where(*where).order_by(Event.pos).offset(offset).limit(limit)).all()
        return MetricsPage(items=[r["metrics"] for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}/samples", summary="Rows of the samples tables (prompts, responses, rewards), paged",
            responses=errors(404))
def job_samples(job_id: str, db: DbDep, caller: CallerDep,
                split: Literal["general", "target", "eval"] | None = Query(None, description="Only this split's rows."),
                step: int | None = Query(None, ge=0, description="Only this step's table."),
                limit: int = Query(1000, ge=1, le=10000), offset: OffsetQuery = 0) -> SamplesPage:
    """Every row the driver streamed, filtered here: a table is a few dozen rows every few steps."""
    with db.read() as s:
        store.get_run(s, job_id, kind="job", scope=caller.scope)
        tables = s.scalars(select(Event.data).where(Event.run_id == job_id, Event.type == "samples")
                           .order_by(Event.pos)).all()
    rows = [{"step": t["step"], **r} for t in tables if step in (None, t["step"])
            for r in t["rows"] if split in (None, r["split"])]
    return SamplesPage(items=rows[offset : offset + limit], total=len(rows), limit=limit, offset=offset)


# response_class Response, not PlainTextResponse: that would declare the JSON errors as text/plain too
@router.get("/{job_id}/logs", response_class=Response, summary="Driver log (Ray's, else the streamed lines)",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}} | errors(404))
def job_logs(job_id: str, db: DbDep, launcher: LauncherDep, caller: CallerDep,
             tail: int | None = Query(None, ge=1, le=100_000)) -> PlainTextResponse:
    """The Ray job's full stdout/stderr when Ray still has it; otherwise the `log` lines the driver streamed."""
    return run_log(db, launcher, job_id, "job", caller.scope, tail)


def run_log(db, launcher, run_id: str, kind: str, scope, tail: int | None) -> PlainTextResponse:
    """A job's or a sweep's driver log: Ray's while it keeps it, else the `log` lines the driver streamed."""
    with db.read() as s:
        ray_job_id = store.get_run(s, run_id, kind=kind, scope=scope).ray_job_id
        text = None
        if ray_job_id is not None:
            try:
                text = launcher.logs(ray_job_id)
            except LauncherUnavailable:
                text = None
        if text is None:
            rows = s.scalars(select(Event.data).where(Event.run_id == run_id, Event.type == "log")
                             .order_by(Event.pos)).all()
            text = "".join(r["line"] + "\n" for r in rows)
    if tail is not None:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    return PlainTextResponse(text)


@router.get("/{job_id}/artifacts", summary="Checkpoints, final model dir and other outputs", responses=errors(404))
def job_artifacts(job_id: str, db: DbDep, settings: SettingsDep, caller: CallerDep) -> Artifacts:
    with db.read() as s:
        reported = dict(store.get_run(s, job_id, kind="job", scope=caller.scope).artifacts or {})
    out = reported.get("output_dir")
    root = _own_dir(out, settings.runs_dir / job_id)
    checkpoints = (sorted(str(p) for p in (root / "checkpoints").glob("step_*"))
                   if root else list(reported.get("checkpoints", [])))
    model = reported.get("model") or (str(root / "model") if root and (root / "model").is_dir() else None)
    files = None
    if root:
        files = [ArtifactFile(path=str(p.relative_to(root)), bytes=p.stat().st_size)
                 for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()][:MAX_LISTED_FILES]
    return Artifacts(output_dir=out, model=model, checkpoints=checkpoints, reported=reported, files=files)


def _own_dir(reported: str | None, run_dir: Path) -> Path | None:
    """The reported output_dir, if this process sees it and it lies inside the job's own run
    directory; else None. Whoever holds the job's ingest token chooses what is reported, so
    without this check the listing would walk any directory on the host."""
    root = Path(reported).resolve() if reported else None
    return root if root is not None and root.is_relative_to(run_dir.resolve()) and root.is_dir() else None
