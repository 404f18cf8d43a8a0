"""The outbox and the rejected table.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("remote_addr", sa.Text(), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column("auth_key", sa.Text(), nullable=True),
        sa.Column("override_key", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_state_id", "outbox", ["state", "id"])
    op.create_table(
        "rejected",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("remote_addr", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rejected"),
    )
    op.create_index("ix_rejected_received_at_ms", "rejected", ["received_at_ms"])


def downgrade() -> None:
    op.drop_index("ix_rejected_received_at_ms", table_name="rejected")
    op.drop_table("rejected")
    op.drop_index("ix_outbox_state_id", table_name="outbox")
    op.drop_table("outbox")
