"""Alembic environment: runs on the connection `migrate.upgrade` passes in (never an ini file)."""

from alembic import context
from sqlalchemy import create_engine

from services.control_plane.db import Base

connection = context.config.attributes.get("connection")


def run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:  # the alembic CLI (revision --autogenerate): the database named by `-x url=...`
    with create_engine(context.get_x_argument(as_dictionary=True)["url"]).begin() as conn:
        run(conn)
