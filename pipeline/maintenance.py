"""Housekeeping jobs: retention of old rows, and SQLite WAL checkpoints."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Table, delete, exists, select

from pipeline.config import WorkerConfig
from pipeline.schema import deliveries, events, outbox, rejected
from pipeline.store import Store, now_ms

log = logging.getLogger("trackrelay.maintenance")

DAY_MS = 86_400_000
# Deletes go in small transactions so the receiver's commits never wait long for the lock.
CHUNK = 1000


def _delete_in_chunks(store: Store, table: Table, *conditions: Any) -> int:
    total = 0
    while True:
        with store.engine.begin() as conn:
            ids = select(table.c.id).where(*conditions).limit(CHUNK).scalar_subquery()
            count = conn.execute(delete(table).where(table.c.id.in_(ids))).rowcount
        total += count
        if count < CHUNK:
            return total


def apply_retention(store: Store, worker: WorkerConfig) -> dict[str, int]:
    """Delete what is past its retention; never a pending outbox row or a pending delivery."""
    now = now_ms()
    removed = {
        # Failed rows (set aside by the decoder) are kept as long as decoded ones, for inspection.
        "outbox": _delete_in_chunks(store, outbox, outbox.c.state.in_(["done", "failed"]),
                                    outbox.c.received_at_ms < now - int(worker.outbox_retention_days * DAY_MS)),
        "delivered": _delete_in_chunks(store, deliveries, deliveries.c.state == "delivered",
                                       deliveries.c.finished_at_ms < now - int(worker.delivered_retention_days * DAY_MS)),
        "dead": _delete_in_chunks(store, deliveries, deliveries.c.state == "dead",
                                  deliveries.c.finished_at_ms < now - int(worker.dead_retention_days * DAY_MS)),
        # An event is the deduplication record of its messageId: kept for the window, and for
        # as long as a delivery still needs it.
        "events": _delete_in_chunks(store, events,
                                    events.c.received_at_ms < now - int(worker.dedup_window_days * DAY_MS),
                                    ~exists().where(deliveries.c.event_id == events.c.id)),
        "rejected": _delete_in_chunks(store, rejected,
                                      rejected.c.received_at_ms < now - int(worker.rejected_retention_days * DAY_MS)),
    }
    if any(removed.values()):
        log.info("event=retention %s", " ".join(f"{k}={v}" for k, v in removed.items()))
    return removed


def checkpoint_wal(store: Store) -> tuple[int, int, int] | None:
    """SQLite: copy the WAL into the database and truncate it, so it cannot grow without bound.
    Returns SQLite's (busy, log pages, checkpointed pages); None on other backends."""
    if store.backend != "sqlite":
        return None
    raw = store.engine.raw_connection()
    try:
        # Outside any transaction: the raw connection is in autocommit (isolation_level None).
        row = raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        raw.close()
    return tuple(row) if row else None
