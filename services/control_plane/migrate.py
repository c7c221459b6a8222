"""Schema migrations (Alembic): `upgrade(engine)` brings any database to the newest revision.

The server calls it at startup, so a deploy with a newer image migrates its database in place.
Revisions live in `migrations/versions/`; `alembic.ini` says how to write a new one.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect, text

INI = Path(__file__).resolve().with_name("alembic.ini")
# Versions before Alembic made their tables with `create_all`; their schema is this revision's.
BASELINE = "0001"
# Any constant: serialises two control planes that start at once on one Postgres database.
_PG_LOCK_ID = 0x64727074


def upgrade(engine: Engine) -> None:
    """Stamp a pre-Alembic database with BASELINE, then upgrade to head, in one transaction
    where the backend has transactional DDL (Postgres)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        cfg = Config(str(INI))
        cfg.attributes["connection"] = conn  # migrations/env.py runs on it
        tables = set(inspect(conn).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
