"""Run lifecycle and event streams: every change to a job or sweep goes through here.

States move forward only: QUEUED -> PENDING (submitted to Ray) -> RUNNING -> SUCCEEDED | FAILED |
CANCELLED | DIVERGED, and a terminal state is final (so Ray's FAILED for a driver that exits
non-zero after reporting DIVERGED changes nothing). Each change the control plane makes is also
appended to the run's stream as a `state` event; a driver's own `state` events are stored as sent
and applied (or, when the run is already terminal, stored with `ignored` saying why). Ingest is
idempotent by the driver's `seq`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from drpt_ray.config import INT32_MAX
from drpt_ray.reporting import STATES, TERMINAL, best_trial as best_of, running_best
from services.control_plane.db import ACTIVE, DEFAULT_TENANT, Database, Event, Job, Sweep, Trial, now


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


# Any id a version of the store could have written (new_id makes `job_` + 16 hex digits); anything else,
# a NUL above all, is a miss before it reaches the database.
RUN_ID = re.compile(r"(job|swp)_[A-Za-z0-9_-]{1,64}")


def new_id(kind: str) -> str:
    return f"{'swp' if kind == 'sweep' else 'job'}_{secrets.token_hex(8)}"


def model_of(run_id: str) -> type[Job] | type[Sweep]:
    return Sweep if run_id.startswith("swp_") else Job


def get_run(s: Session, run_id: str, for_update: bool = False,
            kind: str | None = None, scope: str | None = None) -> Job | Sweep:
    """The job or sweep `run_id` (of `kind` when given, of tenant `scope` when given: a route passes
    its caller's); NotFound otherwise, the same for another tenant's run as for no run. An id no
    version of the store could have written never reaches the database (Postgres refuses a NUL in
    text with an error, not a miss)."""
    model = {"job": Job, "sweep": Sweep}.get(kind) or model_of(run_id)
    if not RUN_ID.fullmatch(run_id):
        raise NotFound(f"no {'sweep' if model is Sweep else 'job'} with id {run_id!r}")
    run = s.get(model, run_id, with_for_update=for_update or None)
    if run is None or (scope is not None and run.tenant != scope):
        raise NotFound(f"no {'sweep' if model is Sweep else 'job'} with id {run_id!r}")
    return run


def append(s: Session, run: Job | Sweep, data: dict, seq: int | None = None) -> Event:
    run.n_events += 1
    ev = Event(run_id=run.id, pos=run.n_events, seq=seq, type=data["type"], data=data, created_at=now())
    s.add(ev)
    return ev


def transition(s: Session, run: Job | Sweep, state: str, message: str | None = None, *, record: bool = True) -> bool:
    """Move `run` forward to `state`; False (and nothing changes) if that is not forward."""
    if run.state in TERMINAL or STATES.index(state) <= STATES.index(run.state):
        return False
    run.state = state
    run.message = message  # describes the state it comes with
    if state == "RUNNING" and run.started_at is None:
        run.started_at = now()
    if state in TERMINAL:
        run.finished_at = now()
    if record:
        append(s, run, {"type": "state", "state": state, "message": message, "ts": now()})
    return True


# ----------------------------------------------------------------------------------------------
# creation and cancel


def create(s: Session, kind: str, spec: dict, name: str | None,
           mode: str | None = None, tenant: str = DEFAULT_TENANT) -> Job | Sweep:
    """A new QUEUED run of `tenant`, added in the caller's write transaction: whatever else the caller
    writes there (an idempotency key) commits with it, or nothing does."""
    fields = dict(id=new_id(kind), tenant=tenant, name=name, state="QUEUED", spec=spec, created_at=now(), artifacts={},
                  n_events=0, last_seq=0, cancel_requested=False)
    run = Sweep(**fields) if kind == "sweep" else Job(mode=mode, **fields)
    s.add(run)
    append(s, run, {"type": "state", "state": "QUEUED", "message": None, "ts": now()})
    return run


def request_cancel(db: Database, run_id: str, kind: str | None = None,
                   scope: str | None = None) -> tuple[Job | Sweep, str | None]:
    """Mark the run CANCELLED; returns it and the Ray job to stop (None if it never reached Ray)."""
    with db.write() as s:
        run = get_run(s, run_id, for_update=True, kind=kind, scope=scope)
        if run.state in TERMINAL:
            raise Conflict(f"{run_id} is already {run.state}; only QUEUED, PENDING or RUNNING runs can be cancelled")
        run.cancel_requested = True
        transition(s, run, "CANCELLED", "cancelled by request")
        return run, run.ray_job_id


# ----------------------------------------------------------------------------------------------
# ingest


@dataclass
class IngestResult:
    stored: int
    last_seq: int
    terminal: bool  # the run reached a terminal state in this batch
    types: list[str]  # types of the events stored (not the skipped duplicates)


def ingest(db: Database, run_id: str, events: list[dict]) -> IngestResult:
    """Store a driver's events (skipping seqs already stored) and apply their effects."""
    with db.write() as s:
        run = get_run(s, run_id, for_update=True)
        seqs = sorted({e["seq"] for e in events})
        have = set(s.scalars(select(Event.seq).where(Event.run_id == run_id, Event.seq.in_(seqs)))) if seqs else set()
        fresh, seen = [], set(have)
        for e in sorted(events, key=lambda e: e["seq"]):
            if e["seq"] not in seen:
                seen.add(e["seq"])
                fresh.append(e)
        was_terminal = run.state in TERMINAL
        if fresh and not (fresh[0]["type"] == "state" and fresh[0].get("state") == "RUNNING"):
            transition(s, run, "RUNNING", "driver reporting")
        for e in fresh:
            _apply(s, run, e)
            append(s, run, e, seq=e["seq"])
        if fresh:
            run.last_seq = max(run.last_seq, fresh[-1]["seq"])
        return IngestResult(len(fresh), run.last_seq, run.state in TERMINAL and not was_terminal,
                            [e["type"] for e in fresh])


def _apply(s: Session, run: Job | Sweep, e: dict) -> None:
    kind = e["type"]
    if kind == "state":
        if e.get("artifacts"):
            run.artifacts = {**(run.artifacts or {}), **e["artifacts"]}
        if not transition(s, run, e["state"], e.get("message"), record=False) and e["state"] != run.state:
            e["ignored"] = f"run already {run.state}"
    elif kind == "metrics" and isinstance(run, Job):
        run.last_step = max(run.last_step or 0, e["step"])
    elif kind == "trial" and isinstance(run, Sweep):
        _apply_trial(s, run, e)
    elif kind == "sweep" and isinstance(run, Sweep):
        run.best = {k: e.get(k) for k in ("best_trial_id", "best_value", "best_config", "metric", "mode")}


def _apply_trial(s: Session, sweep: Sweep, e: dict) -> None:
    key = (sweep.id, str(e["trial_id"]))
    t = s.get(Trial, key)
    if t is None:
        t = Trial(sweep_id=key[0], trial_id=key[1], config=e.get("config") or {},
                  state="PENDING", metrics={}, steps=0, updated_at=now())
        s.add(t)
        s.flush()
    t.state = e.get("state") or t.state
    m = e.get("metrics") or {}
    if m:
        t.metrics = {**t.metrics, **m}
        t.steps = m.get("step", t.steps)
        if isinstance(m.get(sweep.spec["metric"]), (int, float)):
            t.value = float(m[sweep.spec["metric"]])
            t.best_value = running_best(t.best_value, t.value, sweep.spec["mode"])
    if e.get("error"):
        t.error = str(e["error"])
    t.updated_at = now()


# ----------------------------------------------------------------------------------------------
# queries


def list_runs(s: Session, model, state: str | None, limit: int, offset: int, scope: str | None = None):
    """A page of runs, newest first, with the total; of tenant `scope` only when given."""
    q = select(model)
    count = select(func.count()).select_from(model)
    if state:
        q, count = q.where(model.state == state), count.where(model.state == state)
    if scope is not None:
        q, count = q.where(model.tenant == scope), count.where(model.tenant == scope)
    items = s.scalars(q.order_by(model.created_at.desc(), model.id).limit(limit).offset(offset)).all()
    return items, s.scalar(count)


def events_after(s: Session, run_id: str, after: int, limit: int, types: tuple[str, ...] | None = None) -> list[Event]:
    # Positions are INTEGER (int32) and a resume point may be any int64: one past INT32_MAX is
    # past every event, and Postgres refuses to bind it as an INTEGER parameter, so clamp it.
    q = select(Event).where(Event.run_id == run_id, Event.pos > min(after, INT32_MAX))
    if types:
        q = q.where(Event.type.in_(types))
    return list(s.scalars(q.order_by(Event.pos).limit(limit)))


def count_active(s: Session) -> dict[str, int]:
    """Runs holding a slot (submitted to Ray, PENDING or RUNNING), by tenant."""
    out: dict[str, int] = {}
    for m in (Job, Sweep):
        q = select(m.tenant, func.count()).where(m.state.in_(ACTIVE), m.ray_job_id.is_not(None)).group_by(m.tenant)
        for tenant, n in s.execute(q):
            out[tenant] = out.get(tenant, 0) + n
    return out


def best_trial(sweep: Sweep, trials: list[Trial]) -> Trial | None:
    """The driver's pick when it sent one, else the best last-reported value of the sweep metric."""
    if sweep.best and sweep.best.get("best_trial_id"):
        for t in trials:
            if t.trial_id == sweep.best["best_trial_id"]:
                return t
    return best_of(trials, sweep.spec["mode"])
