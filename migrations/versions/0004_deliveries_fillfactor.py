"""Postgres: fill deliveries' pages to 40% so that a claim's lease is a HOT update.

A claim writes a new version of each row it leases. With full pages that version went to
another page and every one of the table's four indexes got a new entry; with room left on the
page, and no indexed column changed by the claim (pipeline.queue), Postgres writes it beside the
old one and touches no index. A claim leases every row of a page within moments, so the page
needs room for a second, longer version of each of its rows: measured, 40% (pipeline.schema
says why not 50%). Rows already stored keep their pages until they are rewritten.

Workers of an older version must not run beside this one (README, Storage: upgrading).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FILLFACTOR = 40  # pipeline.schema.DELIVERIES_FILLFACTOR when this was written; a migration stays as it was


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE deliveries SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE deliveries RESET (fillfactor)")
