"""Helpers for pipeline storage tests: write and read the pipeline tables directly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from sqlalchemy import Table, insert, select

from pipeline.config import DatabaseConfig
from pipeline.schema import deliveries, events, outbox, rejected
from pipeline.store import Store, now_ms

TABLES = {"outbox": outbox, "rejected": rejected, "events": events, "deliveries": deliveries}


def opened_store(database_url: str) -> Iterator[Store]:
    """Body of each test file's ``store`` fixture: a Store on the test database, closed after."""
    opened = Store.open(DatabaseConfig(url=database_url))
    yield opened
    assert opened.engine.pool.checkedout() == 0, "a connection was left checked out"
    opened.dispose()


def outbox_row(body: Any, route: str = "batch", *, received_at_ms: int | None = None, source: str = "default",
               remote_addr: str | None = "203.0.113.7", auth_key: str | None = None,
               override_key: str | None = None, state: str = "pending") -> dict[str, Any]:
    """An outbox row as the receiver stores it."""
    return {"received_at_ms": now_ms() if received_at_ms is None else received_at_ms, "route": route,
            "source": source, "body": body if isinstance(body, bytes) else orjson.dumps(body),
            "remote_addr": remote_addr, "user_agent": "tests", "auth_key": auth_key,
            "override_key": override_key, "state": state}


def rows(store: Store, name: str) -> list[dict[str, Any]]:
    table: Table = TABLES[name]
    with store.engine.connect().execution_options(readonly=True) as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]


def insert_rows(store: Store, name: str, values: list[dict[str, Any]]) -> list[int]:
    """Insert rows into a table and return their ids, in order."""
    table: Table = TABLES[name]
    with store.engine.begin() as conn:
        return [conn.execute(insert(table).values(**v).returning(table.c.id)).scalar_one() for v in values]


def add_event(store: Store, message_id: str, *, received_at_ms: int | None = None, source: str = "default",
              event_name: str = "Signed Up") -> int:
    payload = {"type": "track", "event": event_name, "userId": "u1", "messageId": message_id}
    (event_id,) = insert_rows(store, "events", [{
        "source": source, "message_id": message_id, "type": "track", "event_name": event_name, "outbox_id": None,
        "received_at_ms": now_ms() if received_at_ms is None else received_at_ms,
        "payload": orjson.dumps(payload)}])
    return event_id


def add_delivery(store: Store, event_id: int, destination: str = "hook", *, state: str = "pending",
                 next_attempt_at_ms: int | None = None, created_at_ms: int | None = None,
                 finished_at_ms: int | None = None, attempts: int = 0) -> int:
    now = now_ms()
    (delivery_id,) = insert_rows(store, "deliveries", [{
        "event_id": event_id, "destination": destination, "state": state, "attempts": attempts,
        "created_at_ms": now if created_at_ms is None else created_at_ms,
        "next_attempt_at_ms": now if next_attempt_at_ms is None else next_attempt_at_ms,
        "finished_at_ms": finished_at_ms}])
    return delivery_id
