"""The control plane's Python SDK: `Client`, `Job`, `Sweep`, typed stream events and `ApiError`.

    from drpt_ray.client import ApiError, Client, MetricsReport

    client = Client("http://127.0.0.1:8000", token)          # or DRPT_URL / DRPT_TOKEN / ~/.drpt/token
    job = client.submit({"mode": "sft", "steps": 50}, idempotency_key="sft-50-a")  # a JobSpec or a dict
    # job = client.submit(spec, working_dir="my_project")    # ships the directory: its modules and data
    for ev in job.events():                                   # typed; resumes after a dropped connection
        if isinstance(ev, MetricsReport):
            print(ev.step, ev.metrics.get("loss"))
    job.wait(timeout=600)                                     # "SUCCEEDED", "FAILED", "CANCELLED" or "DIVERGED"
    history = job.metrics()                                   # one dict per reported step
    best = client.submit_sweep(sweep_spec).best()             # a TrialPublic, or None yet
    try:
        client.submit({"regularizer": {"tau": -1}})
    except ApiError as e:                                     # e.status 422, e.paths ["body.regularizer.tau"]
        print(e.message)

Responses are the wire models the control plane answers with (drpt_ray/wire.py: JobPublic,
SweepPublic, TrialPublic, ...), shared with the server; the SDK imports nothing of the server.

The `drpt-ray` commands that use it (submit, status, logs, cancel, sweep, serve) are in
drpt_ray/service_cli.py. Every refusal is an `ApiError` (a `ClientError`, a ValueError).
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drpt_ray.config import JobSpec, SweepSpec
from drpt_ray.reporting import TERMINAL
from drpt_ray import wire
from drpt_ray.working_dir import pack
from drpt_ray.wire import (DEFAULT_URL, ErrorResponse, FieldError, JobPage,
                           JobPublic, MetricsPage, RunPublic, SamplesPage, State, SweepPage,
                           SweepPublic, TrialPublic)

TOKEN_FILE = Path("~/.drpt/token").expanduser()
METRICS_PAGE = 10_000  # the most GET /v1/jobs/{id}/metrics returns at once
M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", bound="_Run")


class ClientError(ValueError):
    """A request that could not be sent, or a stream that stayed lost."""


class ApiError(ClientError):
    """A request the control plane refused: its status and its `ErrorResponse`.

    Attributes:
        status: the HTTP status (4xx for anything the caller can fix).
        message: the API's one-line reason.
        fields: the bad fields of a 422, each with its path (`loc`), `msg`, `type` and `input`.
    """

    def __init__(self, status: int, message: str, fields: list[FieldError], request: httpx.Request):
        self.status, self.message, self.fields = status, message, fields
        super().__init__(f"{request.method} {request.url.path}: HTTP {status}: {message}")

    @property
    def paths(self) -> list[str]:
        """The bad fields' dotted paths: `body.regularizer.tau`, `query.offset`, `header.idempotency-key`."""
        return [".".join(map(str, f.loc)) for f in self.fields]

    @classmethod
    def of(cls, r: httpx.Response) -> "ApiError":
        try:
            error = ErrorResponse.model_validate_json(r.content)
        except ValidationError:  # not the API's shape: a proxy's page, say
            error = ErrorResponse(message=r.text[:300])
        message = f"{error.message} (set --token or DRPT_TOKEN)" if r.status_code == 401 else error.message
        return cls(r.status_code, message, error.detail, r.request)


def _raise_for(r: httpx.Response) -> None:
    if r.status_code >= 400:
        raise ApiError.of(r)


# ----------------------------------------------------------------------------------------------
# Server-Sent Events


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: str

    def json(self) -> dict:
        return json.loads(self.data) if self.data else {}


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Parse SSE lines (without newlines) into events; comments (heartbeats) are skipped."""
    event, data, id_ = None, [], None
    for line in lines:
        if not line:
            if data or event:
                yield SSEEvent(id_, event or "message", "\n".join(data))
            event, data, id_ = None, [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id":
            id_ = value


# ----------------------------------------------------------------------------------------------
# typed events: the driver's event models (drpt_ray/wire.py, one schema) as the stream delivers them

# Lenient where the ingest models are strict: a client must read what an older control plane
# stored and ignore fields a newer one adds.
_STREAMED = ConfigDict(extra="ignore", strict=False)


class _Streamed(BaseModel):
    id: int | None = Field(
        None, description="Position in the run's stream (the SSE id; what Last-Event-ID resumes after).",
    )
    seq: int | None = Field(
        None, description="The driver's sequence number; none on the control plane's own state events.",
    )


class StateChange(_Streamed, wire.StateEvent):
    model_config = _STREAMED
    state: State  # the control plane's own transitions too (QUEUED, PENDING)


class MetricsReport(_Streamed, wire.MetricsEvent):
    model_config = _STREAMED


class LogLine(_Streamed, wire.LogEvent):
    model_config = _STREAMED


class Alert(_Streamed, wire.AlertEvent):
    model_config = _STREAMED


class SamplesTable(_Streamed, wire.SamplesEvent):
    model_config = _STREAMED


class TrialReport(_Streamed, wire.TrialEvent):
    model_config = _STREAMED


class SweepSummary(_Streamed, wire.SweepEvent):
    model_config = _STREAMED


class End(BaseModel):
    """The stream's last event: the run is terminal and every stored event was sent."""

    state: State
    message: str | None = None


Event = StateChange | MetricsReport | LogLine | Alert | SamplesTable | TrialReport | SweepSummary | End
_EVENTS: dict[str, type[Event]] = {"state": StateChange, "metrics": MetricsReport, "log": LogLine, "alert": Alert,
                                   "samples": SamplesTable, "trial": TrialReport, "sweep": SweepSummary, "end": End}


def parse_event(ev: SSEEvent) -> Event | None:
    """The typed form of one streamed event; None for a type this SDK does not know (a newer server's)."""
    model = _EVENTS.get(ev.event)
    return None if model is None else model.model_validate(ev.json() | {"id": int(ev.id) if ev.id else None})


# ----------------------------------------------------------------------------------------------
# HTTP client


class Client:
    """Synchronous client of the `/v1` API. Every refusal raises `ApiError`; an unreachable server `ClientError`."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0):
        self.url = (url or os.environ.get("DRPT_URL") or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get("DRPT_TOKEN") or saved_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ClientError(f"cannot reach the control plane at {self.url} ({type(e).__name__}); is `drpt-ray "
                              "serve` running?") from None
        _raise_for(r)
        return r

    def call(self, model: type[M], method: str, path: str, **kwargs) -> M:
        """`request`, its JSON body read into `model`."""
        return model.model_validate_json(self.request(method, path, **kwargs).content)

    def submit(self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None,
               working_dir: str | Path | None = None) -> "Job":
        """Submit a JobSpec (or its dict). With `idempotency_key`, resending the same spec under the
        same key within 24 h returns the first job instead of a second one: safe to retry.

        With `working_dir`, that directory ships with the job (drpt_ray.working_dir packs it): the job
        runs in it, imports its modules from it and reads the spec's relative data paths from it. The
        server must allow it (its DRPT_WORKING_DIR_MAX_BYTES); a `module:function` the spec names must
        still be on its DRPT_USER_CODE_MODULES.
        """
        if working_dir is None:
            return self._create(Job, spec, idempotency_key)
        body = {"spec": _set_fields(spec), "working_dir": base64.b64encode(pack(working_dir)).decode()}
        return self._post(Job, "/v1/jobs/with-working-dir", body, idempotency_key)

    def submit_sweep(self, spec: SweepSpec | dict[str, Any], idempotency_key: str | None = None) -> "Sweep":
        """Start a Ray Tune sweep (a SweepSpec or its dict); `idempotency_key` as in `submit`."""
        return self._create(Sweep, spec, idempotency_key)

    def job(self, job_id: str) -> "Job":
        return Job.fetch(self, job_id)

    def sweep(self, sweep_id: str) -> "Sweep":
        return Sweep.fetch(self, sweep_id)

    def run(self, run_id: str) -> "Job | Sweep":
        """The job or sweep with this id (sweep ids start with `swp_`)."""
        return _handle(run_id).fetch(self, run_id)

    def jobs(self, state: str | None = None, limit: int | None = None, offset: int = 0) -> JobPage:
        """One page of jobs, newest first (`limit` None: the server's default page size)."""
        return self.call(JobPage, "GET", "/v1/jobs", params=_page(state, limit, offset))

    def sweeps(self, state: str | None = None, limit: int | None = None, offset: int = 0) -> SweepPage:
        return self.call(SweepPage, "GET", "/v1/sweeps", params=_page(state, limit, offset))

    def follow(self, run_id: str, after: int = 0, reconnect_for_s: float = 120.0) -> Iterator[SSEEvent]:
        """The run's SSE stream to its `end` event, reconnecting with Last-Event-ID when the connection
        drops (a restarting control plane) for up to `reconnect_for_s` seconds of failed attempts."""
        last, path, down_since = after, f"{_handle(run_id).path_of(run_id)}/events", None
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with self._http.stream("GET", path, headers=headers, timeout=httpx.Timeout(10.0, read=90.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for(r)
                    down_since = None
                    for ev in iter_sse(r.iter_lines()):
                        if ev.id and ev.id.isdigit():
                            last = int(ev.id)
                        yield ev
                        if ev.event == "end":
                            return
            except httpx.TransportError as e:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect_for_s:
                    raise ClientError(f"lost the event stream of {run_id} at {self.url} ({type(e).__name__})") from None
                time.sleep(1.0)

    def _create(self, handle: type[R], spec: BaseModel | dict[str, Any], idempotency_key: str | None) -> R:
        return self._post(handle, f"/v1/{handle.collection}", _set_fields(spec), idempotency_key)

    def _post(self, handle: type[R], path: str, body: dict[str, Any], idempotency_key: str | None) -> R:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return handle(self, self.call(handle.public, "POST", path, json=body, headers=headers))


def _set_fields(spec: BaseModel | dict[str, Any]) -> dict[str, Any]:
    # Only what the caller set: the server fills in the defaults, so a spec means what its
    # server's version of the schema says.
    return spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, BaseModel) else spec


def _page(state: str | None, limit: int | None, offset: int) -> dict:
    return {"offset": offset} | ({"state": state} if state else {}) | ({"limit": limit} if limit else {})


def saved_token() -> str | None:
    return TOKEN_FILE.read_text().strip() if TOKEN_FILE.is_file() else None


# ----------------------------------------------------------------------------------------------
# run handles


class _Run:
    """What a job and a sweep handle share. `info` is the run as last fetched (`refresh()` fetches it again)."""

    collection: ClassVar[str]
    public: ClassVar[type[RunPublic]]

    def __init__(self, client: Client, info: RunPublic):
        self.client, self.info = client, info

    @classmethod
    def path_of(cls, run_id: str) -> str:
        return f"/v1/{cls.collection}/{run_id}"

    @classmethod
    def fetch(cls, client: Client, run_id: str):
        return cls(client, client.call(cls.public, "GET", cls.path_of(run_id)))

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def path(self) -> str:
        return self.path_of(self.id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, state={self.info.state!r})"

    def refresh(self) -> RunPublic:
        self.info = self.client.call(self.public, "GET", self.path)
        return self.info

    def events(self, after: int = 0, reconnect_for_s: float = 120.0) -> Iterator[Event]:
        """The run's events after stream position `after`, typed, to the `End` event. A dropped
        connection is resumed where it broke (Last-Event-ID): no event is lost or repeated.

        Raises:
            ClientError: the server stayed unreachable for `reconnect_for_s` seconds.
        """
        for raw in self.client.follow(self.id, after, reconnect_for_s):
            ev = parse_event(raw)
            if ev is not None:
                yield ev

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> State:
        """Block until the run ends; returns its final state (SUCCEEDED, FAILED, CANCELLED or DIVERGED).

        Raises:
            TimeoutError: still not ended after `timeout` seconds (None: wait as long as it takes).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.refresh().state not in TERMINAL:
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.id} is still {self.info.state} after {timeout} s")
            time.sleep(min(poll_s, left))
        return self.info.state

    def cancel(self) -> RunPublic:
        """Cancel the run (409, as an ApiError, if it already ended); returns it as it is now."""
        self.info = self.client.call(self.public, "POST", f"{self.path}/cancel")
        return self.info

    def logs(self) -> str:
        """The driver's log (a sweep's: its Tune driver's): Ray's full output while Ray keeps it, else
        the lines the driver streamed."""
        return self.client.request("GET", f"{self.path}/logs").text


class Job(_Run):
    collection, public = "jobs", JobPublic
    info: JobPublic

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics history: one dict per reported step, in the order the driver reported them."""
        return self._all(MetricsPage, "metrics", {})

    def samples(self, split: str | None = None, step: int | None = None) -> list[dict[str, Any]]:
        """Rows of the samples tables (`JobSpec.samples`): `step`, `split`, `group`, `prompt`,
        `response`, `reward`, `advantage`; optionally one split's or one step's only."""
        return self._all(SamplesPage, "samples", {k: v for k, v in (("split", split), ("step", step)) if v is not None})

    def _all(self, page_model: type[MetricsPage] | type[SamplesPage], what: str, params: dict) -> list[dict[str, Any]]:
        """Every item of a paged list, page by page."""
        rows: list[dict[str, Any]] = []
        while True:
            page = self.client.call(page_model, "GET", f"{self.path}/{what}",
                                    params=params | {"limit": METRICS_PAGE, "offset": len(rows)})
            rows += page.items
            if not page.items or len(rows) >= page.total:
                return rows


class Sweep(_Run):
    collection, public = "sweeps", SweepPublic
    info: SweepPublic

    def trials(self) -> list[TrialPublic]:
        """The trials as they are now (configs, states, latest metrics)."""
        return self.refresh().trials

    def best(self) -> TrialPublic | None:
        """The best trial now: the Tune driver's pick once it made one, else the best last value of
        the sweep's metric; None before any trial reported it."""
        return self.refresh().best


def _handle(run_id: str) -> type[Job] | type[Sweep]:
    return Sweep if run_id.startswith("swp_") else Job
