"""Alembic migrations on SQLite and PostgreSQL: the newest revision is exactly the models' schema,
and a database made before Alembic (create_all, no alembic_version) upgrades in place, rows intact."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, create_engine, inspect, select, text

from services.control_plane import migrate, store
from services.control_plane.db import Base, Database, engine_url
from tests.control_plane.conftest import BACKENDS, database_url

# The tables every version before Alembic made with create_all: revision 0001's schema, made here by
# upgrading to 0001 and dropping alembic_version (today's models have more columns, e.g. tenant).
PRE_ALEMBIC_TABLES = ("jobs", "sweeps", "trials", "events", "meta")
HEAD = ScriptDirectory.from_config(Config(str(migrate.INI))).get_current_head()


def assert_at_head_with_the_models_schema(engine: Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == HEAD
        assert compare_metadata(ctx, Base.metadata) == []  # no column, index or constraint differs


def test_a_new_database_is_at_head_with_exactly_the_models_schema(db):
    assert_at_head_with_the_models_schema(db.engine)
    migrate.upgrade(db.engine)  # what every later start does: nothing
    assert_at_head_with_the_models_schema(db.engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pre_alembic_database_upgrades_in_place_with_its_rows(request, backend, tmp_path):
    url = database_url(request, backend, tmp_path)
    legacy = create_engine(engine_url(url))
    with legacy.begin() as conn:
        cfg = Config(str(migrate.INI))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, migrate.BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
    old = MetaData()
    old.reflect(legacy)
    assert "alembic_version" not in inspect(legacy).get_table_names() and "tenant" not in old.tables["jobs"].columns

    def table(name: str):  # the old schema's
        return old.tables[name]

    with legacy.begin() as conn:  # rows as the old version wrote them
        run = dict(state="RUNNING", message=None, created_at=1.0e9,
                   started_at=1.0e9 + 5, finished_at=None, ray_job_id="raysubmit_1",
                   ray_status="RUNNING", cancel_requested=False, last_seq=2,
                   n_events=3, artifacts={"output_dir": "runs/api/x"})
        conn.execute(table("jobs").insert(),
                     [run | dict(id="job_old", name="old job", spec={"steps": 3}, mode="sft", last_step=1)])
        conn.execute(table("sweeps").insert(),
                     [run | dict(id="swp_old", name=None, spec={"metric": "loss", "mode": "min"}, best=None)])
        conn.execute(table("trials").insert(), [dict(sweep_id="swp_old", trial_id="t0",
                                                     config={"lr": 0.1}, state="RUNNING",
                                                     metrics={"loss": 1.5}, value=1.5, best_value=1.5,
                                                     steps=2, error=None, updated_at=1.0e9)])
        conn.execute(table("events").insert(), [dict(run_id="job_old", pos=i + 1, seq=i or None,
                                                     type=t, data={"type": t}, created_at=1.0e9)
                                                for i, t in enumerate(("state", "state", "metrics"))])
        conn.execute(table("meta").insert(), [dict(key="ingest_secret", value="kept")])
    before = snapshot(legacy, old)
    legacy.dispose()

    db = Database(url)  # the new version starting on the old database
    try:
        assert_at_head_with_the_models_schema(db.engine)
        assert snapshot(db.engine, old) == before  # the old columns' values, untouched
        with db.read() as s:  # the new version reads them, as the default tenant's
            assert store.get_run(s, "job_old", scope="default").state == "RUNNING"
            assert store.get_run(s, "swp_old", scope="default").tenant == "default"
            assert [e.type for e in store.events_after(s, "job_old", 0, 10)] == ["state", "state", "metrics"]
    finally:
        db.dispose()


def snapshot(engine: Engine, old: MetaData) -> dict[str, list]:
    """Every row of the pre-Alembic tables, the old schema's columns only, ordered by primary key."""
    with engine.connect() as conn:
        out = {}
        for t in PRE_ALEMBIC_TABLES:
            cols = [Base.metadata.tables[t].columns[c.name] for c in old.tables[t].columns]
            out[t] = [tuple(r)
                      for r in conn.execute(select(*cols).order_by(*Base.metadata.tables[t].primary_key.columns))]
        return out
