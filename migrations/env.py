"""Alembic environment: runs on the connection that ``pipeline.migrate`` hands over."""

from __future__ import annotations

from alembic import context

from pipeline.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `trackrelay migrate`, which supplies the database connection")

# Batch mode lets ALTERs work on SQLite (it copies the table); a no-op on Postgres.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
