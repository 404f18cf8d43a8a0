"""Backlogs for the drain figures: outbox rows written straight through ``Store.append``, shaped
as the receiver stores a ``/v1/batch`` request of 100 messages, and the wait until a worker
has delivered all of them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import exists, func, select, update

from pipeline.config import DatabaseConfig, load_config
from pipeline.decoder import Decoder
from pipeline.schema import deliveries, outbox
from pipeline.store import Store, now_ms

from bench.databases import Database
from bench.messages import SOURCE, USER_AGENT, WRITE_KEY, batch_body
from bench.processes import BenchError, Process
from bench.servers import write_config
from bench.session import Session

PER_REQUEST = 100
ROWS_PER_COMMIT = 100


def decoded_backlog(session: Session, backend: str, events: int, tag: str,
                    destinations: tuple[Mapping[str, Any], ...]) -> Database:
    """A fresh database holding ``events`` pending deliveries to each of ``destinations``,
    decoded here (untimed); dropped again if that fails. Vacuumed on Postgres, as after each
    reset (see reset_deliveries), so that every run of a figure starts from the same table:
    without it the first run also paid for setting the hint bits of every new row (R8's
    batch_size-100 row: 15.8-20.4k events/s on the fresh backlog, 26k on a vacuumed one)."""
    database = session.databases.create(backend)
    try:
        fill_outbox(database, events, tag)
        config = write_config(session.workdir, database, destinations=destinations)
        if (decoded := decode_all(database, str(config))) != events:
            raise BenchError(f"decoded {decoded} events, expected {events}")
        vacuum(database)
    except BaseException:
        session.databases.drop(database)
        raise
    return database


def open_store(database: Database) -> Store:
    return Store.open(DatabaseConfig(url=database.url))


def fill_outbox(database: Database, events: int, tag: str) -> None:
    """``events`` messages (unique messageIds) as pending outbox rows of 100 messages each."""
    store = open_store(database)
    try:
        rows = []
        for start in range(0, events, PER_REQUEST):
            rows.append({"received_at_ms": now_ms(), "route": "batch", "source": SOURCE,
                         "body": batch_body(tag, start, min(PER_REQUEST, events - start)),
                         "remote_addr": "127.0.0.1", "user_agent": USER_AGENT, "auth_key": WRITE_KEY,
                         "override_key": None})
            if len(rows) == ROWS_PER_COMMIT:
                store.append(rows)
                rows = []
        if rows:
            store.append(rows)
    finally:
        store.dispose()


def decode_all(database: Database, config_path: str) -> int:
    """Decode every pending outbox row here, in this process (untimed set-up); returns events."""
    store = open_store(database)
    try:
        decoder = Decoder(store, load_config(config_path, env={}))
        total = 0
        while True:
            result = decoder.decode_pending(limit=500)
            total += result.events
            if result.rows == 0:
                return total
    finally:
        store.dispose()


def reset_deliveries(database: Database, destination: str) -> int:
    """Make every delivery to ``destination`` pending and due again, as new (no worker runs).

    On Postgres the table is vacuumed after: the reset leaves a dead version of every row
    and its index entries, which the next run's claims stepped over until autovacuum came
    (R8's batch_size-100 row on a 150k backlog: 17-20k events/s on the fresh backlog, 11-14k
    on the reset one; a backlog that is really new has no such dead rows)."""
    store = open_store(database)
    now = now_ms()
    try:
        with store.engine.begin() as conn:
            reset = conn.execute(update(deliveries).where(deliveries.c.destination == destination).values(
                state="pending", attempts=0, created_at_ms=now, next_attempt_at_ms=now, locked_until_ms=None,
                locked_by=None, last_attempt_at_ms=None, finished_at_ms=None, last_error=None)).rowcount
        return reset
    finally:
        store.dispose()
        vacuum(database)


def vacuum(database: Database) -> None:
    """VACUUM (ANALYZE) the deliveries on Postgres (nothing on SQLite)."""
    if database.backend != "postgres":
        return
    store = open_store(database)
    try:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) deliveries")
    finally:
        store.dispose()


def wait_drained(database: Database, destination: str, expected: int, worker: Process,
                 timeout: float, poll: float = 0.25) -> float:
    """Wait until the outbox is decoded and ``expected`` deliveries to ``destination`` are
    delivered; return when the last one was (epoch seconds, from ``finished_at_ms``)."""
    store = open_store(database)
    pending_outbox = select(func.count()).select_from(outbox).where(outbox.c.state == "pending")
    pending_delivery = select(exists().where(deliveries.c.destination == destination,
                                             deliveries.c.state == "pending"))
    deadline = time.monotonic() + timeout
    try:
        while True:
            worker.check_alive()
            with store.engine.connect().execution_options(readonly=True) as conn:
                if conn.execute(pending_outbox).scalar_one() == 0 and not conn.execute(pending_delivery).scalar_one():
                    delivered, last = conn.execute(
                        select(func.count(), func.max(deliveries.c.finished_at_ms))
                        .where(deliveries.c.destination == destination, deliveries.c.state == "delivered")).one()
                    if delivered != expected:
                        raise BenchError(f"{delivered} deliveries to {destination} delivered, expected {expected}")
                    return last / 1000
            if time.monotonic() > deadline:
                raise BenchError(f"the worker did not drain {expected} events within {timeout:.0f} s")
            time.sleep(poll)
    finally:
        store.dispose()
