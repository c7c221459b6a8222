"""Public API models. The request bodies are `drpt_ray.config.JobSpec` / `SweepSpec` themselves
(one schema); these are the responses and the driver's ingest batch."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drpt_ray.reporting import DRIVER_STATES, STATES
from services.control_plane.db import Job, Sweep, Trial

State = Literal[STATES]


def _ts(x: float | None) -> datetime | None:
    return None if x is None else datetime.fromtimestamp(x, tz=timezone.utc)


class RunPublic(BaseModel):
    id: str
    name: str | None
    state: State
    message: str | None = Field(description="Why the run is in its state (a failure's reason).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    ray_job_id: str | None = Field(description="Ray Jobs API submission id (once submitted).")
    events: int = Field(description="Events in the run's stream (the last SSE id).")
    artifacts: dict[str, Any] = Field(description="Paths the driver reported (output_dir, model, checkpoints, ...).")

    @staticmethod
    def _common(run: Job | Sweep) -> dict:
        return dict(
            id=run.id, name=run.name, state=run.state, message=run.message, created_at=_ts(run.created_at),
            started_at=_ts(run.started_at), finished_at=_ts(run.finished_at), ray_job_id=run.ray_job_id,
            events=run.n_events, artifacts=run.artifacts or {},
        )


class JobPublic(RunPublic):
    mode: str
    step: int | None = Field(description="Last step the driver reported metrics for.")
    steps: int = Field(description="The spec's total steps.")
    spec: dict[str, Any] = Field(description="The full JobSpec, defaults filled in.")

    @classmethod
    def of(cls, job: Job) -> "JobPublic":
        return cls(**cls._common(job), mode=job.mode, step=job.last_step, steps=job.spec["steps"], spec=job.spec)


class TrialPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    trial_id: str
    config: dict[str, Any]
    state: str
    steps: int
    value: float | None = Field(description="Last reported value of the sweep metric.")
    best_value: float | None = Field(description="Best reported value of the sweep metric.")
    metrics: dict[str, Any] = Field(description="Latest value of every metric the trial reported.")
    error: str | None


class SweepPublic(RunPublic):
    spec: dict[str, Any]
    metric: str
    mode: str
    trials: list[TrialPublic]
    best: TrialPublic | None = Field(description="Best trial (the driver's pick, else the best last value of `metric`).")

    @classmethod
    def of(cls, sweep: Sweep, trials: list[Trial], best: Trial | None) -> "SweepPublic":
        return cls(
            **cls._common(sweep), spec=sweep.spec, metric=sweep.spec["metric"], mode=sweep.spec["mode"],
            trials=[TrialPublic.model_validate(t) for t in trials],
            best=TrialPublic.model_validate(best) if best is not None else None,
        )


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class JobPage(Page):
    items: list[JobPublic]


class SweepPage(Page):
    items: list[SweepPublic]


class MetricsPage(Page):
    items: list[dict[str, Any]] = Field(description="One dict per reported step (as run_job reported it), in stream order.")


class ArtifactFile(BaseModel):
    path: str
    bytes: int


class Artifacts(BaseModel):
    output_dir: str | None
    model: str | None
    checkpoints: list[str]
    reported: dict[str, Any] = Field(description="Everything the driver reported.")
    files: list[ArtifactFile] | None = Field(description="Files under output_dir, when the control plane can see that directory.")


class IngestEvent(BaseModel):
    """One driver event (see drpt_ray/reporting.py); type-specific fields ride along."""

    model_config = ConfigDict(extra="allow")
    seq: int = Field(ge=1)
    type: Literal["state", "metrics", "log", "alert", "trial", "sweep"]
    ts: float | None = None

    @model_validator(mode="after")
    def _fields(self) -> "IngestEvent":
        extra = self.model_extra or {}
        if self.type == "state" and extra.get("state") not in DRIVER_STATES:
            raise ValueError(f"state event needs state in {DRIVER_STATES}, got {extra.get('state')!r}")
        if self.type == "metrics" and not isinstance(extra.get("metrics"), dict):
            raise ValueError("metrics event needs a `metrics` object")
        if self.type == "trial" and not extra.get("trial_id"):
            raise ValueError("trial event needs a `trial_id`")
        if self.type == "alert":
            _check_alert(extra)
        return self


def _check_alert(fields: dict) -> None:
    """Extra fields are not type-checked by pydantic, so an alert's are checked here, strictly: a
    string "3" is refused rather than read as step 3."""
    step, message = fields.get("step"), fields.get("message")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"alert event needs `step`, an integer >= 0, got {step!r}")
    if not isinstance(message, str) or not message.strip():
        raise ValueError(f"alert event needs `message`, a non-empty string, got {message!r}")


class IngestBatch(BaseModel):
    events: list[IngestEvent] = Field(max_length=1000)


class IngestAck(BaseModel):
    stored: int = 0
    last_seq: int
