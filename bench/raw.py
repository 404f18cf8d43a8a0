"""The database ceilings, measured from plain Python without trackrelay (R3 and R4).

- ``inserts``: one row per event, 100 rows per transaction, for SECONDS. SQLite: the sqlite3
  module, WAL, ``synchronous=FULL``, ``executemany``. Postgres: psycopg's ``executemany``
  (pipelined by psycopg 3).
- ``claims``: a scratch queue of N per-event rows; then, timed, claim 100 pending rows and mark
  them done in one transaction, until none is left (Postgres: ``FOR UPDATE SKIP LOCKED``).

Run by ``bench`` in a subprocess pinned to the server CPU; prints one JSON object.

    python -m bench.raw inserts sqlite PATH --seconds 5
    python -m bench.raw claims postgres URL --events 100000
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from typing import Any

import orjson
import psycopg

from bench.messages import delivered_event_body, message

BATCH = 100
# The textbook queue index: only pending rows, in claim order, so a claim never walks past done ones.
PENDING_INDEX = "CREATE INDEX raw_queue_pending ON raw_queue (id) WHERE state = 'pending'"


def _sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def inserts(backend: str, dsn: str, seconds: float) -> dict[str, Any]:
    rows = [(orjson.dumps(message("raw", i)),) for i in range(BATCH)]
    done = 0
    if backend == "sqlite":
        conn = _sqlite(dsn)
        conn.execute("CREATE TABLE raw_events (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO raw_events (payload) VALUES (?)", rows)
            conn.execute("COMMIT")
            done += BATCH
        elapsed = time.perf_counter() - start
        conn.close()
    else:
        with psycopg.connect(dsn) as pg:
            pg.execute("CREATE TABLE raw_events (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)")
            pg.commit()
            start = time.perf_counter()
            with pg.cursor() as cur:
                while time.perf_counter() - start < seconds:
                    cur.executemany("INSERT INTO raw_events (payload) VALUES (%s)", rows)
                    pg.commit()
                    done += BATCH
            elapsed = time.perf_counter() - start
    return {"events": done, "seconds": elapsed, "rate": done / elapsed}


def claims(backend: str, dsn: str, events: int) -> dict[str, Any]:
    payload = delivered_event_body()
    done = 0
    if backend == "sqlite":
        conn = _sqlite(dsn)
        conn.execute("CREATE TABLE raw_queue (id INTEGER PRIMARY KEY, state TEXT NOT NULL, payload BLOB NOT NULL)")
        conn.execute(PENDING_INDEX)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO raw_queue (state, payload) VALUES ('pending', ?)",
                         ((payload,) for _ in range(events)))
        conn.execute("COMMIT")
        start = time.perf_counter()
        while True:
            conn.execute("BEGIN IMMEDIATE")
            ids = [row[0] for row in conn.execute(
                "SELECT id, payload FROM raw_queue WHERE state = 'pending' ORDER BY id LIMIT ?", (BATCH,))]
            if ids:
                conn.execute(f"UPDATE raw_queue SET state = 'done' WHERE id IN ({','.join('?' * len(ids))})", ids)
            conn.execute("COMMIT")
            if not ids:
                break
            done += len(ids)
        elapsed = time.perf_counter() - start
        conn.close()
    else:
        with psycopg.connect(dsn) as pg:
            pg.execute("CREATE TABLE raw_queue (id BIGSERIAL PRIMARY KEY, state TEXT NOT NULL, payload BYTEA NOT NULL)")
            pg.execute(PENDING_INDEX)
            with pg.cursor().copy("COPY raw_queue (state, payload) FROM STDIN") as copy:
                for _ in range(events):
                    copy.write_row(("pending", payload))
            pg.commit()
            pg.execute("ANALYZE raw_queue")
            pg.commit()
            start = time.perf_counter()
            while True:
                ids = [row[0] for row in pg.execute(
                    "SELECT id, payload FROM raw_queue WHERE state = 'pending' ORDER BY id LIMIT %s "
                    "FOR UPDATE SKIP LOCKED", (BATCH,))]
                if ids:
                    pg.execute("UPDATE raw_queue SET state = 'done' WHERE id = ANY(%s)", (ids,))
                pg.commit()
                if not ids:
                    break
                done += len(ids)
            elapsed = time.perf_counter() - start
    return {"events": done, "seconds": elapsed, "rate": done / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["inserts", "claims"])
    parser.add_argument("backend", choices=["sqlite", "postgres"])
    parser.add_argument("dsn", help="SQLite file path or libpq URL")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    if args.what == "inserts":
        result = inserts(args.backend, args.dsn, args.seconds)
    else:
        result = claims(args.backend, args.dsn, args.events)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
