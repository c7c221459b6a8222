"""Database rows -> the wire models the API answers with (drpt_ray.wire)."""

from __future__ import annotations

from datetime import datetime, timezone

from drpt_ray.wire import JobPublic, SweepPublic, TrialPublic
from services.control_plane.db import Job, Sweep, Trial


def _ts(x: float | None) -> datetime | None:
    return None if x is None else datetime.fromtimestamp(x, tz=timezone.utc)


def _common(run: Job | Sweep) -> dict:
    return dict(
        id=run.id, tenant=run.tenant, name=run.name, state=run.state,
        message=run.message, created_at=_ts(run.created_at),
        started_at=_ts(run.started_at), finished_at=_ts(run.finished_at), ray_job_id=run.ray_job_id,
        events=run.n_events, artifacts=run.artifacts or {},
    )


def job_public(job: Job) -> JobPublic:
    return JobPublic(**_common(job), mode=job.mode, step=job.last_step, steps=job.spec["steps"], spec=job.spec)


def sweep_public(sweep: Sweep, trials: list[Trial], best: Trial | None) -> SweepPublic:
    return SweepPublic(
        **_common(sweep), spec=sweep.spec, metric=sweep.spec["metric"], mode=sweep.spec["mode"],
        trials=[TrialPublic.model_validate(t) for t in trials],
        best=TrialPublic.model_validate(best) if best is not None else None,
    )
