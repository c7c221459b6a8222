"""Persistence (SQLAlchemy 2): jobs, sweeps, their trials and every run's event stream.

SQLite file by default, Postgres (`postgresql://`, driven by psycopg 3) in production; the schema
is brought to the newest Alembic revision on start (migrate.py). The API process holds no training
state: a run is its row plus its events, so a restarted control plane picks up where it stopped.

Writes go through `Database.write()`, which serialises them inside this process (SQLite allows
one writer; the lock turns "database is locked" races into a short wait) and, on Postgres, the
run row is locked `FOR UPDATE` while events are appended, so positions never collide.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import (JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine, event,
                        make_url)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from drpt_ray.config import NAME_MAX_LEN
from services.control_plane import migrate

ACTIVE = ("PENDING", "RUNNING")  # submitted to Ray, holding a slot
DEFAULT_TENANT = "default"  # the tenant of a bare API token, and of every run stored before tenants existed


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class RunColumns:
    """What jobs and sweeps share: identity, lifecycle, the Ray submission and stream counters."""

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, server_default=DEFAULT_TENANT)  # the submitting token's
    name: Mapped[str | None] = mapped_column(String(NAME_MAX_LEN))
    # drpt_ray.reporting.STATES; no CHECK, so a new state needs no migration
    state: Mapped[str] = mapped_column(String(16), index=True)
    message: Mapped[str | None] = mapped_column(Text)
    spec: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, index=True)  # unix seconds
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    ray_job_id: Mapped[str | None] = mapped_column(String(80))
    ray_status: Mapped[str | None] = mapped_column(String(16))  # last status seen from Ray
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)  # highest driver seq stored
    n_events: Mapped[int] = mapped_column(Integer, default=0)  # events stored = pos of the newest
    artifacts: Mapped[dict] = mapped_column(JSON, default=dict)


class Job(RunColumns, Base):
    __tablename__ = "jobs"
    mode: Mapped[str] = mapped_column(String(8))
    last_step: Mapped[int | None] = mapped_column(Integer)


class Sweep(RunColumns, Base):
    __tablename__ = "sweeps"
    best: Mapped[dict | None] = mapped_column(JSON)  # the driver's closing `sweep` event


class Trial(Base):
    __tablename__ = "trials"
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id"), primary_key=True)
    trial_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # latest value of every reported key
    value: Mapped[float | None] = mapped_column(Float)  # last reported value of the sweep metric
    best_value: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)


class Event(Base):
    """One entry of a run's stream. `pos` (1, 2, ...) orders the stream and is the SSE id; `seq` is
    the driver's sequence number (None for the control plane's own state changes)."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("run_id", "pos"),
        UniqueConstraint("run_id", "seq"),
        Index("ix_events_run_type_pos", "run_id", "type", "pos"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40))
    pos: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int | None] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class Meta(Base):
    """Control-plane key/value state (the generated ingest secret)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class IdempotencyRecord(Base):
    """The first answer to a create request that carried an `Idempotency-Key` (idempotency.py)."""

    __tablename__ = "idempotency_keys"
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the caller's API token
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the request body
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict] = mapped_column(JSON)
    location: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float, index=True)  # unix seconds; expired rows are purged by it


def now() -> float:
    return time.time()


class Database:
    """Engine + session factories; `write()` is the one door for changes."""

    def __init__(self, url: str):
        self.url = url = engine_url(url)
        if url.startswith("sqlite"):
            self.engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=10, max_overflow=60,
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)
        self._lock = threading.Lock()
        migrate.upgrade(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction committed on exit (rolled back on error), one at a time in this process."""
        with self._lock, Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def engine_url(url: str) -> str:
    """A plain `postgresql://` URL means psycopg 3, the driver installed (SQLAlchemy's default
    for that scheme is psycopg2)."""
    u = make_url(url)
    return (u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
            if u.drivername == "postgresql" else url)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (SSE streams) never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
