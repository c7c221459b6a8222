"""tenants: every job and sweep belongs to the tenant of the token that submitted it.

Runs stored before tenants existed belong to the tenant of a bare API token, 'default'.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

RUN_TABLES = ("jobs", "sweeps")


def upgrade() -> None:
    for table in RUN_TABLES:
        # The server default fills the existing rows, and stays (SQLite alters a column only by
        # rebuilding its table, which the trials' foreign key to sweeps forbids).
        op.add_column(table, sa.Column("tenant", sa.String(64), nullable=False, server_default="default"))
        op.create_index(f"ix_{table}_tenant", table, ["tenant"])


def downgrade() -> None:
    for table in RUN_TABLES:
        op.drop_index(f"ix_{table}_tenant", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
