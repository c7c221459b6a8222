"""Event streams: drivers post into `/v1/ingest/{run_id}`; clients follow SSE on
`/v1/jobs/{id}/events` and `/v1/sweeps/{id}/events`.

SSE frames: `id:` = the event's position in the run's stream, `event:` = its type (state, metrics,
log, alert, trial, sweep), `data:` = the event JSON, strict (no NaN or Infinity: ingest refuses
them, a driver sends a non-finite metric as null). A client that reconnects with
`Last-Event-ID: N` (or `?after=N`; 0 <= N < 2**63, else 422 before the stream starts) gets
everything after N, so nothing is missed across a dropped connection or a control-plane restart.
Once the run is terminal and every stored event is sent, one `end` event (`data: {"state": ...,
"message": ...}`) closes the stream; comment lines keep idle connections alive every
DRPT_SSE_HEARTBEAT_S.

A browser's EventSource cannot send the `Authorization` header: it opens the `events_url` of
`POST /v1/{jobs,sweeps}/{id}/stream-token`, whose `stream_token` reads that one run for
DRPT_STREAM_TOKEN_TTL_S (security.StreamTokens). An API token in the header wins over one in the
query, so a client that sends both is judged by its header. With an API token, another tenant's
run is a 404; a stream token opens the one run it was minted for. Ingest takes only the run's own
ingest token (the driver's): an API token cannot post events into a run.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Annotated
from urllib.parse import urlencode

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials
from sse_starlette import EventSourceResponse

from drpt_ray.config import INT64_MAX
from drpt_ray.reporting import TERMINAL
from services.control_plane.strict_json import StrictJSONRoute
from services.control_plane import store
from services.control_plane.db import Database
from services.control_plane.deps import CallerDep, DbDep, HubDep, SupervisorDep
from services.control_plane.errors import errors
from drpt_ray.wire import IngestAck, IngestBatch, StreamToken
from services.control_plane.notify import Hub
from services.control_plane.security import bearer, bearer_token, require_api_token

router = APIRouter(tags=["events"], route_class=StrictJSONRoute)
PAGE = 500
SSE_DOC = {200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events (see the module docstring)."}}
# Event ids are checked before the stream starts: a bad one is a 422, never a stream that breaks mid-way.
AfterQuery = Annotated[int | None,
                       Query(ge=0, le=INT64_MAX, description="Resume after this event id (same as Last-Event-ID).")]
LastEventIdHeader = Annotated[int | None,
                              Header(ge=0, le=INT64_MAX,
                                     description="Resume after this event id (EventSource sends it on reconnect).")]
FollowQuery = Annotated[bool, Query(description="false: send what is stored, then end.")]
# A security scheme (not a plain query parameter), so /openapi.json says the stream takes either.
stream_token_query = APIKeyQuery(name="stream_token", auto_error=False, scheme_name="StreamToken",
                                 description="A stream token from POST .../stream-token (a browser's EventSource "
                                 "cannot send a header).")


def _fetch(db: Database, run_id: str, kind: str, after: int):
    with db.read() as s:
        run = store.get_run(s, run_id, kind=kind)
        rows = store.events_after(s, run_id, after, PAGE)
        return [(e.pos, e.type, e.data) for e in rows], run.state, run.message


async def _stream(db: Database, hub: Hub, run_id: str, kind: str, after: int, follow: bool):
    last = after
    while True:
        woken = hub.event(run_id)  # taken before the read, so a notify during it is not lost
        rows, state, message = await anyio.to_thread.run_sync(_fetch, db, run_id, kind, last)
        for pos, typ, data in rows:
            yield {"id": str(pos), "event": typ, "data": _strict_json(data)}
            last = pos
        if len(rows) == PAGE:
            continue
        if state in TERMINAL or not follow:
            yield {"event": "end", "data": json.dumps({"state": state, "message": message})}
            return
        await woken.wait()


def _strict_json(data) -> str:
    """JSON that `JSON.parse` accepts: ingest refuses NaN and +-Infinity, and one stored before it did
    is sent as null."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        return json.dumps(json.loads(json.dumps(data), parse_constant=lambda _: None))


def _sse(request: Request, db: Database, hub: Hub, run_id: str, kind: str, scope: str | None, after: int | None,
         last_event_id: int | None, follow: bool):
    with db.read() as s:
        store.get_run(s, run_id, kind=kind, scope=scope)  # 404 before the stream starts
    start = after if after is not None else last_event_id or 0
    return EventSourceResponse(
        _stream(db, hub, run_id, kind, start, follow), ping=request.app.state.settings.sse_heartbeat_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _stream_reader(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                   stream_token: Annotated[str | None, Depends(stream_token_query)]) -> str | None:
    """An API token in the header (returns its caller's scope), or a stream token for this run (the
    route's one path parameter; it was minted for a caller who could see the run: scope None)."""
    if stream_token is not None and creds is None:
        (run_id,) = request.path_params.values()
        if not request.app.state.stream_tokens.check(run_id, stream_token, time.time()):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"invalid or expired stream token for {run_id}: mint a new one")
        return None
    return require_api_token(request, creds).scope


StreamScope = Annotated[str | None, Depends(_stream_reader)]


@router.get("/v1/jobs/{job_id}/events", responses=SSE_DOC | errors(404), summary="Follow a job (SSE)")
def job_events(job_id: str, request: Request, db: DbDep, hub: HubDep, scope: StreamScope, after: AfterQuery = None,
               follow: FollowQuery = True, last_event_id: LastEventIdHeader = None):
    return _sse(request, db, hub, job_id, "job", scope, after, last_event_id, follow)


@router.get("/v1/sweeps/{sweep_id}/events", responses=SSE_DOC | errors(404), summary="Follow a sweep (SSE)")
def sweep_events(sweep_id: str, request: Request, db: DbDep, hub: HubDep, scope: StreamScope, after: AfterQuery = None,
                 follow: FollowQuery = True, last_event_id: LastEventIdHeader = None):
    return _sse(request, db, hub, sweep_id, "sweep", scope, after, last_event_id, follow)


def _mint(request: Request, db: Database, run_id: str, kind: str, scope: str | None) -> StreamToken:
    with db.read() as s:
        store.get_run(s, run_id, kind=kind, scope=scope)  # 404 for an unknown id or another tenant's run
    token, expires = request.app.state.stream_tokens.mint(run_id, time.time())
    return StreamToken(token=token, expires_at=datetime.fromtimestamp(expires, tz=timezone.utc),
                       events_url=f"/v1/{kind}s/{run_id}/events?{urlencode({'stream_token': token})}")


STREAM_TOKEN_DOC = ("A token that opens this run's event stream from a browser's EventSource (`?stream_token=`), "
                    "for DRPT_STREAM_TOKEN_TTL_S.")


@router.post("/v1/jobs/{job_id}/stream-token", responses=errors(404), summary="Mint a stream token for a job",
             description=STREAM_TOKEN_DOC)
def job_stream_token(job_id: str, request: Request, db: DbDep, caller: CallerDep) -> StreamToken:
    return _mint(request, db, job_id, "job", caller.scope)


@router.post("/v1/sweeps/{sweep_id}/stream-token", responses=errors(404), summary="Mint a stream token for a sweep",
             description=STREAM_TOKEN_DOC)
def sweep_stream_token(sweep_id: str, request: Request, db: DbDep, caller: CallerDep) -> StreamToken:
    return _mint(request, db, sweep_id, "sweep", caller.scope)


# ----------------------------------------------------------------------------------------------
# ingest (the driver side; see drpt_ray/reporting.py for the format)


def _ingest_auth(run_id: str, request: Request,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """The run's own ingest token (derived from its id: the driver's, and nobody else's)."""
    token = bearer_token(creds)
    if not request.app.state.keys.check(run_id, token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"invalid ingest token for {run_id}")


IngestAuth = Depends(_ingest_auth)


@router.get("/v1/ingest/{run_id}", dependencies=[IngestAuth], tags=["ingest"],
            responses=errors(404), summary="Last stored driver seq")
def ingest_position(run_id: str, db: DbDep) -> IngestAck:
    with db.read() as s:
        return IngestAck(last_seq=store.get_run(s, run_id).last_seq)


@router.post("/v1/ingest/{run_id}", dependencies=[IngestAuth], tags=["ingest"],
             responses=errors(404), summary="Store a batch of driver events")
def ingest_events(run_id: str, batch: IngestBatch, request: Request, db: DbDep,
                  hub: HubDep, supervisor: SupervisorDep) -> IngestAck:
    events = [e.model_dump(exclude_unset=True) for e in batch.events]  # as the driver sent them
    result = store.ingest(db, run_id, events)
    if result.stored:
        request.app.state.metrics.count_events(result.types)
        hub.notify(run_id)
    if result.terminal:
        supervisor.wake()  # a slot is free
    return IngestAck(stored=result.stored, last_seq=result.last_seq)
