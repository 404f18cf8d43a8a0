"""pipeline.maintenance: retention deletes what is past its window and nothing still needed; WAL checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import make_url

from pipeline.config import WorkerConfig
from pipeline.maintenance import apply_retention, checkpoint_wal
from pipeline.store import Store, now_ms
from stored_rows import add_delivery, add_event, opened_store, outbox_row, rows

DAY = 86_400_000


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


def days_ago(days: float) -> int:
    return now_ms() - int(days * DAY)


def rejected_row(received_at_ms: int, code: str) -> dict[str, Any]:
    return {"received_at_ms": received_at_ms, "route": "track", "source": None, "status": 400, "code": code,
            "reason": "Missing event", "raw": b"{}", "remote_addr": "203.0.113.7"}


def ids(store: Store, table: str, column: str = "id") -> list[Any]:
    return [r[column] for r in rows(store, table)]


def test_retention_deletes_what_is_past_its_window_and_keeps_the_rest(store: Store) -> None:
    store.append([outbox_row({"batch": []}, received_at_ms=days_ago(8), state="done", remote_addr="old-done"),
                  outbox_row({"batch": []}, received_at_ms=days_ago(8), state="pending", remote_addr="old-pending"),
                  outbox_row({"batch": []}, received_at_ms=days_ago(1), state="done", remote_addr="new-done")],
                 [rejected_row(days_ago(31), "old"), rejected_row(days_ago(29), "recent")])
    add_event(store, "lone-old", received_at_ms=days_ago(8))
    add_event(store, "lone-recent", received_at_ms=days_ago(1))
    add_delivery(store, add_event(store, "sent-old", received_at_ms=days_ago(9)), state="delivered",
                 finished_at_ms=days_ago(8))
    sent_recent = add_delivery(store, add_event(store, "sent-recent", received_at_ms=days_ago(9)),
                               state="delivered", finished_at_ms=days_ago(6))
    add_delivery(store, add_event(store, "dead-old", received_at_ms=days_ago(40)), state="dead",
                 finished_at_ms=days_ago(31))
    dead_recent = add_delivery(store, add_event(store, "dead-recent", received_at_ms=days_ago(40)), state="dead",
                               finished_at_ms=days_ago(29))
    waiting = add_delivery(store, add_event(store, "waiting", received_at_ms=days_ago(40)),
                           created_at_ms=days_ago(40), next_attempt_at_ms=days_ago(40))

    removed = apply_retention(store, WorkerConfig())

    assert removed == {"outbox": 1, "delivered": 1, "dead": 1, "events": 3, "rejected": 1}
    assert ids(store, "outbox", "remote_addr") == ["old-pending", "new-done"]
    assert ids(store, "rejected", "code") == ["recent"]
    assert ids(store, "deliveries") == [sent_recent, dead_recent, waiting]
    assert ids(store, "events", "message_id") == ["lone-recent", "sent-recent", "dead-recent", "waiting"]


def test_retention_windows_come_from_the_config_and_take_fractions(store: Store) -> None:
    store.append([outbox_row({"batch": []}, received_at_ms=days_ago(1), state="done", remote_addr="a-day"),
                  outbox_row({"batch": []}, received_at_ms=days_ago(0.1), state="done", remote_addr="hours")])
    add_delivery(store, add_event(store, "sent", received_at_ms=days_ago(3)), state="delivered",
                 finished_at_ms=days_ago(1))
    add_delivery(store, add_event(store, "dead", received_at_ms=days_ago(3)), state="dead",
                 finished_at_ms=days_ago(1))
    worker = WorkerConfig(outbox_retention_days=0.5, delivered_retention_days=0.5, dead_retention_days=2,
                          dedup_window_days=2, rejected_retention_days=0.5)

    assert apply_retention(store, worker) == {"outbox": 1, "delivered": 1, "dead": 0, "events": 1, "rejected": 0}
    assert ids(store, "outbox", "remote_addr") == ["hours"]
    assert ids(store, "events", "message_id") == ["dead"]


def test_retention_deletes_in_chunks_until_nothing_is_left(store: Store) -> None:
    old = days_ago(8)
    store.append([outbox_row({"batch": []}, received_at_ms=old, state="done") for _ in range(2500)]
                 + [outbox_row({"batch": []}, received_at_ms=old)])

    assert apply_retention(store, WorkerConfig())["outbox"] == 2500
    assert [r["state"] for r in rows(store, "outbox")] == ["pending"]
    assert apply_retention(store, WorkerConfig()) == {"outbox": 0, "delivered": 0, "dead": 0, "events": 0,
                                                      "rejected": 0}


def test_an_event_deleted_after_its_window_lets_its_message_id_through_again(store: Store) -> None:
    event_id = add_event(store, "m1", received_at_ms=days_ago(8))
    add_delivery(store, event_id, state="delivered", finished_at_ms=days_ago(7.5))

    apply_retention(store, WorkerConfig())

    assert rows(store, "events") == rows(store, "deliveries") == []
    add_event(store, "m1")
    assert ids(store, "events", "message_id") == ["m1"]


def test_checkpoint_truncates_the_sqlite_wal_and_does_nothing_elsewhere(store: Store, database_url: str) -> None:
    store.append([outbox_row({"batch": []}) for _ in range(200)])

    if store.backend != "sqlite":
        assert checkpoint_wal(store) is None
        return
    wal = make_url(database_url).database + "-wal"
    assert os.path.getsize(wal) > 0

    busy, log_pages, checkpointed = checkpoint_wal(store)

    assert (busy, log_pages, checkpointed) == (0, 0, 0)
    assert os.path.getsize(wal) == 0
    assert len(rows(store, "outbox")) == 200
