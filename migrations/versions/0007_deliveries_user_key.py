"""deliveries.user_key and its partial index: per-user ordering (a destination's ``ordering = "user"``).

The decoder copies events.user_id into user_key for the deliveries of ordered destinations
only; a claim then takes a delivery with a user_key only when no earlier delivery of the same
user to the same destination is pending (pipeline.queue). The index holds only those pending
ordered deliveries, so destinations without ordering never write to it.

Deliveries stored before this revision have no user_key: they are delivered unordered, as
before, even to a destination that turns ordering on.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_PENDING_ORDERED = "state = 'pending' AND user_key IS NOT NULL"


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("user_key", sa.Text(), nullable=True))
    op.create_index("ix_deliveries_user_order", "deliveries", ["destination", "user_key", "id"],
                    postgresql_where=sa.text(_PENDING_ORDERED), sqlite_where=sa.text(_PENDING_ORDERED))


def downgrade() -> None:
    op.drop_index("ix_deliveries_user_order", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("user_key")
