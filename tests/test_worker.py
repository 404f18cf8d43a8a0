"""pipeline.worker.Worker, the real one on its own event loop in a thread: a backlog drains
without waiting for ticks, APScheduler stays out of the log, a database outage is one
structured line per job (not a traceback per tick) and the worker recovers, and a worker
without destinations says so."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from http_sink import Answer
from outage import store_down
from pipeline.config import Config
from pipeline.store import Store
from pipeline_harness import Database, ScriptedSink, ThreadWorker, read_config, wait_for, webhook, write_config
from stored_rows import opened_store, outbox_row

NULL = {"name": "null", "type": "null"}


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


def config(tmp_path: Path, database_url: str, destinations: list[dict[str, Any]],
           **worker: Any) -> Config:
    return read_config(write_config(tmp_path / "trackrelay.toml", database_url, destinations, worker=worker))


def append_tracks(store: Store, count: int, prefix: str = "m") -> None:
    store.append([outbox_row({"type": "track", "event": "E", "userId": "u1", "messageId": f"{prefix}{i}"}, "track")
                  for i in range(count)])


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_a_backlog_is_drained_at_once_not_one_poll_interval_at_a_time(
        tmp_path: Path, database_url: str, store: Store, db: Database) -> None:
    append_tracks(store, 500)
    worker = ThreadWorker(config(tmp_path, database_url, [NULL], poll_interval_seconds=5))
    try:
        # The first ticks run at start; after that the decode job drains all five groups of
        # 100 rows and wakes the delivery job, which claims until nothing is left. Waiting for
        # the next tick (5 s) would miss this deadline.
        wait_for(lambda: db.states("null") == {"delivered": 500}, "500 deliveries", timeout=4)
    finally:
        worker.stop()
    assert db.outbox_pending() == 0


def test_apscheduler_writes_nothing_to_the_log_while_jobs_run_and_overlap(
        tmp_path: Path, database_url: str, store: Store, db: Database, sink: ScriptedSink,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # Each request is held 0.3 s: the 0.05 s ticks of the delivery job find it still running,
    # which APScheduler reports as a skipped run at WARNING unless silenced.
    sink.decide = lambda n, _: Answer(delay=0.3)
    append_tracks(store, 3)
    worker = ThreadWorker(config(tmp_path, database_url, [webhook(sink.url, concurrency=1)]))
    try:
        wait_for(lambda: db.states() == {"delivered": 3}, "three deliveries")
    finally:
        worker.stop()

    assert records(caplog, "event=started role=worker")  # INFO lines are captured
    assert [r.getMessage() for r in caplog.records if r.name.startswith("apscheduler")] == []


def test_an_unavailable_database_is_logged_once_per_job_and_the_worker_recovers(
        tmp_path: Path, database_url: str, store: Store, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    base = config(tmp_path, database_url, [NULL])
    worker = ThreadWorker(replace(base, database=replace(base.database, lock_timeout_seconds=0.2)))
    try:
        append_tracks(store, 1, "before")
        wait_for(lambda: db.states() == {"delivered": 1}, "the first delivery")
        with store_down(database_url):
            wait_for(lambda: records(caplog, "event=job_failed"), "a job_failed line")
            time.sleep(2)  # some 40 ticks of each 0.05 s job while the database is away
            failed = records(caplog, "event=job_failed")
        append_tracks(store, 2, "after")
        wait_for(lambda: db.states() == {"delivered": 3}, "the deliveries after the outage")
    finally:
        worker.stop()

    per_job = Counter(r.getMessage().split()[1] for r in failed)
    assert "job=deliver:null" in per_job, per_job
    assert max(per_job.values()) <= 3, per_job
    assert {(r.levelname, r.exc_info) for r in failed} == {("WARNING", None)}
    assert all("cause=database_unavailable error=" in r.getMessage() for r in failed)
    assert not any(r.exc_info for r in caplog.records if r.name == "trackrelay.worker")


def test_a_worker_without_destinations_warns_that_events_go_nowhere(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    worker = ThreadWorker(config(tmp_path, database_url, []))
    worker.stop()

    assert [r.getMessage() for r in caplog.records if "event=started" in r.getMessage()] == [
        "event=started role=worker destinations=none"]
    (warning,) = records(caplog, "event=no_destinations")
    assert (warning.name, warning.levelname) == ("trackrelay.worker", "WARNING")
