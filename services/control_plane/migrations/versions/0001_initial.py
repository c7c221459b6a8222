"""The schema every control plane before Alembic created: jobs, sweeps, trials, events, meta.

Revision ID: 0001
Revises:
Create Date: 2026-12-02

Frozen here on purpose (not imported from db.py): a later model change is a new revision.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _run_columns() -> list[sa.Column]:
    """RunColumns of db.py as they were: what jobs and sweeps share."""
    return [
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("ray_job_id", sa.String(80), nullable=True),
        sa.Column("ray_status", sa.String(16), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("n_events", sa.Integer(), nullable=False),
        sa.Column("artifacts", sa.JSON(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table("jobs", *_run_columns(), sa.Column("mode", sa.String(8), nullable=False),
                    sa.Column("last_step", sa.Integer(), nullable=True))
    op.create_table("sweeps", *_run_columns(), sa.Column("best", sa.JSON(), nullable=True))
    for table in ("jobs", "sweeps"):
        op.create_index(f"ix_{table}_state", table, ["state"])
        op.create_index(f"ix_{table}_created_at", table, ["created_at"])
    op.create_table(
        "trials",
        sa.Column("sweep_id", sa.String(40), sa.ForeignKey("sweeps.id"), primary_key=True),
        sa.Column("trial_id", sa.String(80), primary_key=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("best_value", sa.Float(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("pos", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("run_id", "pos"),
        sa.UniqueConstraint("run_id", "seq"),
    )
    op.create_index("ix_events_run_type_pos", "events", ["run_id", "type", "pos"])
    op.create_table("meta", sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text(), nullable=False))


def downgrade() -> None:
    for table in ("meta", "events", "trials", "sweeps", "jobs"):
        op.drop_table(table)
