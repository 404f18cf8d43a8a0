"""delivery_controllers: each worker's concurrency controller per destination (its limit, the
round-trip time it measures, what it has in flight), written every few seconds by the worker
so that ``trackrelay status``, the console and ``/metrics``, which run in other processes, can
show them. One row per (destination, worker); a worker deletes its rows when it stops, and a
row not refreshed for a while is a worker that died (status leaves it out).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delivery_controllers",
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("rtt_ms", sa.Float(), nullable=True),
        sa.Column("baseline_rtt_ms", sa.Float(), nullable=True),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("destination", "worker", name="pk_delivery_controllers"),
    )


def downgrade() -> None:
    op.drop_table("delivery_controllers")
