"""The control plane's wire format, shared by the server (services/control_plane) and the SDK
(drpt_ray.client), neither of which imports the other: where the server listens by default, the
response models, the one error shape, and the driver's events and ingest batch. The request bodies
are `drpt_ray.config.JobSpec` / `SweepSpec` themselves (one schema), or a JobSpec with its working
directory (`JobWithWorkingDir`); the server builds responses from its database rows in
services/control_plane/public.py."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Base64Bytes, BaseModel, ConfigDict, Field

from drpt_ray.config import INT32_MAX, JobSpec
from drpt_ray.reporting import DRIVER_STATES, STATES, TRIAL_STATES

HOST, PORT = "127.0.0.1", 8000  # where the control plane listens unless told otherwise
DEFAULT_URL = f"http://{HOST}:{PORT}"

State = Literal[STATES]


class JobWithWorkingDir(BaseModel):
    """The body of `POST /v1/jobs/with-working-dir`: a job and the directory it runs in.

    The zip travels base64 in the JSON body, not as a multipart upload: one content type and one
    strict parser for every body, every refusal a 422 naming its field, the idempotency fingerprint
    covering the zip with the spec, and DRPT_MAX_BODY_BYTES bounding the whole request (the zip
    costs 4/3 of its size there; the working directories this is for are code and small data)."""

    model_config = ConfigDict(extra="forbid")
    spec: JobSpec
    working_dir: Base64Bytes = Field(
        description="A zip (base64) of the directory the job runs in: its modules are importable and its relative "
        "model, data and reward-model paths name files in it. The server must allow it (DRPT_WORKING_DIR_MAX_BYTES).",
    )


class RunPublic(BaseModel):
    id: str
    tenant: str = Field(description="The tenant of the token that submitted it.")
    name: str | None
    state: State
    message: str | None = Field(description="Why the run is in its state (a failure's reason).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    ray_job_id: str | None = Field(description="Ray Jobs API submission id (once submitted).")
    events: int = Field(description="Events in the run's stream (the last SSE id).")
    artifacts: dict[str, Any] = Field(description="Paths the driver reported (output_dir, model, checkpoints, ...).")


class JobPublic(RunPublic):
    mode: str
    step: int | None = Field(description="Last step the driver reported metrics for.")
    steps: int = Field(description="The spec's total steps.")
    spec: dict[str, Any] = Field(description="The full JobSpec, defaults filled in.")


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
    best: TrialPublic | None = Field(
        description="Best trial (the driver's pick, else the best last value of `metric`).",
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
    items: list[dict[str, Any]] = Field(
        description="One dict per reported step (as run_job reported it), in stream order.",
    )


class SamplesPage(Page):
    items: list[dict[str, Any]] = Field(
        description="Rows of the samples tables (`step` and a SampleRow's fields), in stream order.",
    )


class StreamToken(BaseModel):
    token: str = Field(description="Opens this run's event stream as `?stream_token=`; read-only, this run only.")
    expires_at: datetime = Field(
        description="After this a stream cannot be opened (or reopened) with it; one already open goes on.",
    )
    events_url: str = Field(
        description="The stream's path with the token in its query: what a browser's EventSource opens.",
    )


class FieldError(BaseModel):
    loc: list[str | int] = Field(
        description="Where the bad value is: `body.regularizer.tau`, `query.offset`, `header.last-event-id`.",
    )
    msg: str
    type: str = Field(description="pydantic's error type (`missing`, `greater_than`, `json_invalid`, ...).")
    input: Any = Field(None, description="The value refused, when it is a short scalar.")


class ErrorResponse(BaseModel):
    """The body of every 4xx (and of a 500): one line for a person, plus the fields at fault."""

    message: str = Field(description="What was refused and why, in one line.")
    detail: list[FieldError] = Field(
        default_factory=list, description="One item per bad field (a 422); empty otherwise.",
    )


class ArtifactFile(BaseModel):
    path: str
    bytes: int


class Artifacts(BaseModel):
    output_dir: str | None
    model: str | None
    checkpoints: list[str]
    reported: dict[str, Any] = Field(description="Everything the driver reported.")
    files: list[ArtifactFile] | None = Field(
        description="Files under output_dir, when the control plane can see that directory and it lies inside the "
        "job's own run directory (DRPT_RUNS_DIR/<id>)."
    )


Seq = Annotated[int, Field(ge=1, le=INT32_MAX)]  # the events.seq column is an Integer (int32 on Postgres)
Step = Annotated[int, Field(ge=0, le=INT32_MAX)]
Scalar = float | int | str | bool | None  # what reporting._jsonable makes of a metric; floats finite


def _step_is_a_step(metrics: dict) -> dict:
    """A metrics dict's own `step`, when present, is a Step: the sweep store reads it as the trial's."""
    step = metrics.get("step")
    if "step" in metrics and (type(step) is not int or not 0 <= step <= INT32_MAX):  # type(): a bool is no step
        raise ValueError(f"`step` must be an integer in [0, {INT32_MAX}], got {step!r}")
    return metrics


Metrics = Annotated[dict[str, Scalar], AfterValidator(_step_is_a_step)]


class _Event(BaseModel):
    """Fields every driver event has. Strict, like the JobSpec: "3" is not step 3, NaN is refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    seq: Seq
    ts: float | None = None


class StateEvent(_Event):
    type: Literal["state"]
    state: Literal[DRIVER_STATES]
    message: str | None = None
    artifacts: dict[str, str | list[str]] | None = Field(None, description="Paths: output_dir, model, checkpoints, ...")


class MetricsEvent(_Event):
    type: Literal["metrics"]
    step: Step
    metrics: Metrics


class LogEvent(_Event):
    type: Literal["log"]
    line: str


class AlertEvent(_Event):
    type: Literal["alert"]
    step: Step
    message: str = Field(pattern=r"\S", description="Why the divergence guard tripped (not blank).")


class SampleRow(BaseModel):
    """One response of a samples table (`JobSpec.samples`)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    split: Literal["general", "target", "eval"]
    group: int = Field(ge=0, description="The prompt's index in the table: a group's n responses share it.")
    prompt: str = Field(max_length=100_000)
    response: str = Field(max_length=100_000)
    reward: float | None
    advantage: float | None = Field(None, description="The response's mean token advantage (eval rows: none).")
    parts: dict[str, float] = Field(default_factory=dict, description="Each reward function's own score "
                                    "(reward.functions), by name.")


class SamplesEvent(_Event):
    type: Literal["samples"]
    step: Step
    rows: list[SampleRow] = Field(max_length=1024)


class TrialEvent(_Event):
    type: Literal["trial"]
    trial_id: str = Field(min_length=1, max_length=80)  # the trials.trial_id column
    config: dict[str, Scalar] = Field(default_factory=dict)
    state: Literal[TRIAL_STATES]
    metrics: Metrics = Field(default_factory=dict)
    error: str | None = None


class SweepEvent(_Event):
    type: Literal["sweep"]
    state: Literal["TERMINATED"]
    metric: str
    mode: Literal["max", "min"]
    best_trial_id: str | None
    best_value: float | None
    best_config: dict[str, Scalar] | None


# One driver event (drpt_ray/reporting.py's wire format), told apart by `type`.
IngestEvent = Annotated[StateEvent | MetricsEvent | LogEvent | AlertEvent | SamplesEvent | TrialEvent | SweepEvent,
                        Field(discriminator="type")]


class IngestBatch(BaseModel):
    events: list[IngestEvent] = Field(max_length=1000)


class IngestAck(BaseModel):
    stored: int = 0
    last_seq: int
