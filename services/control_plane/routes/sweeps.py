"""`/v1/sweeps`: Ray Tune sweeps over JobSpec fields; trials are real training runs (SSE: routes/events.py)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response
from sqlalchemy import select

from drpt_ray.config import SweepSpec
from services.control_plane.strict_json import StrictJSONRoute
from services.control_plane import store
from services.control_plane.db import Sweep, Trial
from services.control_plane.admission import admit_sweep
from services.control_plane.deps import (ApiAuth, CallerDep, DbDep, IdempotencyKeyDep, LauncherDep, OffsetQuery,
                                         SettingsDep, SupervisorDep)
from services.control_plane.errors import errors
from services.control_plane.idempotency import create_once
from drpt_ray.wire import State, SweepPage, SweepPublic
from services.control_plane.public import sweep_public
from services.control_plane.routes.jobs import run_log

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], dependencies=[ApiAuth], route_class=StrictJSONRoute)


def _public(s, sweep: Sweep) -> SweepPublic:
    trials = list(s.scalars(select(Trial).where(Trial.sweep_id == sweep.id).order_by(Trial.trial_id)))
    return sweep_public(sweep, trials, store.best_trial(sweep, trials))


@router.post("", status_code=201, summary="Start a sweep (body: a SweepSpec)")
def create_sweep(spec: SweepSpec, db: DbDep, supervisor: SupervisorDep, key: IdempotencyKeyDep, settings: SettingsDep,
                 caller: CallerDep) -> SweepPublic:
    admit_sweep(spec, settings, supervisor.launcher)
    body = spec.model_dump(mode="json")

    def create(s):
        sweep = store.create(s, "sweep", body, spec.name, tenant=caller.tenant)
        return _public(s, sweep), f"/v1/sweeps/{sweep.id}"

    response = create_once(db, key, body, create)
    supervisor.wake()
    return response


@router.get("", summary="List sweeps, newest first")
def list_sweeps(db: DbDep, caller: CallerDep, state: State | None = None, limit: int = Query(20, ge=1, le=200),
                offset: OffsetQuery = 0) -> SweepPage:
    with db.read() as s:
        items, total = store.list_runs(s, Sweep, state, limit, offset, scope=caller.scope)
        return SweepPage(items=[_public(s, w) for w in items], total=total, limit=limit, offset=offset)


@router.get("/{sweep_id}", summary="A sweep: trial table (configs, states, metrics) and best trial",
            responses=errors(404))
def get_sweep(sweep_id: str, db: DbDep, caller: CallerDep) -> SweepPublic:
    with db.read() as s:
        return _public(s, store.get_run(s, sweep_id, kind="sweep", scope=caller.scope))


@router.get("/{sweep_id}/logs", response_class=Response,
            summary="The Tune driver's log (Ray's, else the streamed lines)",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}} | errors(404))
def sweep_logs(sweep_id: str, db: DbDep, launcher: LauncherDep, caller: CallerDep,
               tail: int | None = Query(None, ge=1, le=100_000)) -> PlainTextResponse:
    """Why trials failed shows here too: the sweep's driver log, as for a job."""
    return run_log(db, launcher, sweep_id, "sweep", caller.scope, tail)


@router.post("/{sweep_id}/cancel", summary="Cancel a sweep (its Tune driver and trials are stopped)",
             responses=errors(404, 409))
def cancel_sweep(sweep_id: str, db: DbDep, supervisor: SupervisorDep, caller: CallerDep) -> SweepPublic:
    supervisor.cancel(sweep_id, "sweep", caller.scope)
    with db.read() as s:
        return _public(s, store.get_run(s, sweep_id, kind="sweep"))
