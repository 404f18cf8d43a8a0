"""Isolation of claims: a million retrying and dead deliveries must not slow a healthy destination's claims.

Fills a fresh database (SQLite file or Postgres database) with ``--rows`` deliveries of the
destination ``sick``, half waiting for a retry an hour from now and half dead, bulk-inserted in
one statement (a recursive CTE on SQLite, generate_series on Postgres), plus 100 due
deliveries each for ``healthy`` (unordered) and ``healthy-ordered`` (ordering = "user", one
delivery per user). Optionally (``--held N``) adds the ordered destination ``held``, whose
100 users each have one delivery waiting for a retry and N/100 later ones held behind it, their
next attempt moved to the retry's as ``DeliveryQueue.record`` leaves them (``--held-due``:
due now instead, as they were before record moved them, to show what that costs).

After ANALYZE it prints each destination's claim plan (SQLite: EXPLAIN QUERY PLAN; Postgres:
the EXPLAIN (FORMAT JSON) plan's nodes) and times real ``DeliveryQueue.claim`` calls of 100
(each claim's rows are then recorded as due again, untimed). Numbers, not assertions:
tests/test_claim_plans.py asserts on the plans of a smaller table.

    python -m bench.claims sqlite --rows 1000000
    python -m bench.claims postgres --rows 1000000 --held 100000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from bench.databases import DEFAULT_POSTGRES_URL, libpq_url
from pipeline.config import DatabaseConfig
from pipeline.migrate import upgrade
from pipeline.queue import DeliveryQueue
from pipeline.retry import PENDING, Decision
from pipeline.store import Store, now_ms

CLAIM = 100
HOUR_MS = 3_600_000
USERS = 100


def fill(store: Store, rows: int, held: int, held_due: bool = False) -> None:
    """The deliveries described in the module docstring, in a few statements."""
    now = now_ms()
    pg = store.backend == "postgresql"
    mark = "%s" if pg else "?"
    numbers = ("SELECT i FROM generate_series(1, {n}) AS s(i)" if pg else
               "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s")
    columns = ("INSERT INTO deliveries (event_id, destination, state, attempts, created_at_ms, next_attempt_at_ms, "
               "finished_at_ms, last_error, user_key) ")
    with store.engine.begin() as conn:
        event_id = conn.exec_driver_sql(
            f"INSERT INTO events (source, message_id, type, user_id, received_at_ms, payload) "
            f"VALUES ('default', 'bench-claims', 'track', 'u', {mark}, {mark}) RETURNING id",
            (now, b'{"type":"track","event":"Bench","userId":"u","messageId":"bench-claims"}')).scalar_one()
        # Odd rows retry in an hour, even rows are dead: the two states a sick destination piles up.
        conn.exec_driver_sql(
            columns + f"SELECT {event_id}, 'sick', CASE WHEN (i & 1) = 1 THEN 'pending' ELSE 'dead' END, 5, "
            f"{now - HOUR_MS}, {now + HOUR_MS}, CASE WHEN (i & 1) = 1 THEN NULL ELSE {now} END, "
            f"'HTTP 500: upstream down', NULL FROM ({numbers.format(n=rows)}) AS n")
        conn.exec_driver_sql(
            columns + f"SELECT {event_id}, 'healthy', 'pending', 0, {now}, {now}, NULL, NULL, NULL "
            f"FROM ({numbers.format(n=CLAIM)}) AS n")
        conn.exec_driver_sql(
            columns + f"SELECT {event_id}, 'healthy-ordered', 'pending', 0, {now}, {now}, NULL, NULL, "
            f"'user-' || i FROM ({numbers.format(n=CLAIM)}) AS n")
        if held:
            # Each user's first delivery retries in an hour; the rest are held behind it.
            later_at = now if held_due else now + HOUR_MS
            conn.exec_driver_sql(
                columns + f"SELECT {event_id}, 'held', 'pending', 1, {now}, "
                f"CASE WHEN i <= {USERS} THEN {now + HOUR_MS} ELSE {later_at} END, NULL, NULL, "
                f"'user-' || (i - i / {USERS} * {USERS}) FROM ({numbers.format(n=held)}) AS n")
    with store.engine.begin() as conn:  # (a SQLite connection in AUTOCOMMIT mode rolled it back)
        conn.exec_driver_sql("ANALYZE")


def plan_lines(plan: Any) -> list[str]:
    """One line per plan node: SQLite's detail rows, or Postgres's node type, relation and index."""
    if isinstance(plan, list) and plan and isinstance(plan[0], tuple):
        return [detail for _, _, detail in plan]
    lines: list[str] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        parts = [node["Node Type"], node.get("Index Name", ""), node.get("Relation Name", ""),
                 node.get("Subplan Name", ""), f"rows~{node.get('Plan Rows')}"]
        lines.append("  " * depth + " ".join(p for p in parts if p))
        for child in node.get("Plans", []):
            walk(child, depth + 1)

    walk(plan[0]["Plan"], 0)
    return lines


def time_claims(store: Store, destination: str, rounds: int) -> tuple[list[float], int]:
    """Milliseconds per claim of up to 100, and the rows the last one took; each claim's rows
    are then put back as due (untimed)."""
    queue = DeliveryQueue(store, "bench-claims")
    times, taken = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        claimed = queue.claim(destination, CLAIM, 60_000)
        times.append((time.perf_counter() - started) * 1000)
        taken = len(claimed)
        if claimed:
            queue.record(claimed[0].lease, [(c.id, Decision(PENDING, now_ms())) for c in claimed])
    return times, taken


@contextmanager
def opened(backend: str, url: str | None) -> Iterator[Store]:
    """A migrated, empty database of ``backend``, dropped afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="trackrelay-claims-") as folder:
            yield from _migrated(f"sqlite:///{Path(folder) / 'claims.db'}")
        return
    admin = libpq_url(url or DEFAULT_POSTGRES_URL)
    name = f"trackrelay_claims_{os.getpid()}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        database_url = sa.make_url(admin).set(drivername="postgresql+psycopg", database=name)
        yield from _migrated(database_url.render_as_string(hide_password=False))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def _migrated(database_url: str) -> Iterator[Store]:
    engine = sa.create_engine(database_url)
    upgrade(engine)
    engine.dispose()
    store = Store.open(DatabaseConfig(url=database_url))
    try:
        yield store
    finally:
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=("sqlite", "postgres"))
    parser.add_argument("--rows", type=int, default=1_000_000, help="retrying and dead deliveries of 'sick'")
    parser.add_argument("--held", type=int, default=0, help="deliveries of the ordered 'held' destination")
    parser.add_argument("--held-due", action="store_true", help="the held deliveries due now, not at the retry")
    parser.add_argument("--rounds", type=int, default=20, help="claims timed per destination")
    parser.add_argument("--postgres-url", default=None)
    options = parser.parse_args()
    with opened(options.backend, options.postgres_url) as store:
        started = time.perf_counter()
        fill(store, options.rows, options.held, options.held_due)
        held = f"{options.held:,} held{' (due)' if options.held_due else ''}"
        print(f"{options.backend}: {options.rows:,} sick deliveries (half retrying, half dead), {held}, "
              f"filled and analysed in {time.perf_counter() - started:.1f} s")
        destinations = ["healthy", "healthy-ordered", "sick"] + (["held"] if options.held else [])
        for destination in destinations:
            print(f"\n{destination}: claim plan")
            for line in plan_lines(DeliveryQueue(store, "bench-plan").claim_plan(destination)):
                print(f"  {line}")
            times, taken = time_claims(store, destination, options.rounds)
            print(f"{destination}: {len(times)} claims of up to {CLAIM} (took {taken}): median "
                  f"{statistics.median(times):.2f} ms, max {max(times):.2f} ms, first {times[0]:.2f} ms")


if __name__ == "__main__":
    main()
