"""events.user_id: whose event it is (the userId, else the anonymousId), so the console finds
a user's events and deliveries without parsing every payload. Not indexed (pipeline/schema.py
says why).

Events stored before this revision have no user_id (they are kept for the dedup window only,
seven days by default); a search by user finds the events decoded after the upgrade.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("user_id", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("user_id")
