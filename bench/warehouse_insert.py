"""What the ``database`` destination costs in CPU per row: rows per CPU-second of this process.

Builds a DatabaseDestination on a fresh SQLite file and on a throwaway Postgres database
(created on ``--postgres-url``, dropped after), and delivers ``--events`` normalised track
events (bench's SDK batch of 100 through ``expand``, as the worker would hold them) in chunks
of 200 through the synchronous ``_deliver``. CPU time (``time.process_time``) is the figure
to compare: the VM is shared and its wall time noisy. On Postgres it leaves out the server's
CPU, which is what the worker's GIL does not pay for.

    python -m bench.warehouse_insert
    python -m bench.warehouse_insert --backend sqlite --events 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench.databases import DEFAULT_POSTGRES_URL, libpq_url
from bench.messages import SOURCE, WRITE_KEY, batch_body
from pipeline.config import SourceConfig
from pipeline.destinations.base import DELIVERED
from pipeline.destinations.database import DatabaseDestination, DatabaseOptions
from pipeline.normalise import StoredRequest, expand
from pipeline.sources import SourceRegistry

CHUNK = 200


def normalised_events(tag: str, count: int) -> list[dict[str, Any]]:
    registry = SourceRegistry((SourceConfig(name=SOURCE, write_keys=(WRITE_KEY,)),))
    events: list[dict[str, Any]] = []
    for start in range(0, count, 100):
        request = StoredRequest(id=start, received_at_ms=1714564801000 + start, route="batch",
                                body=batch_body(tag, start, min(100, count - start)),
                                remote_addr="127.0.0.1", auth_key=WRITE_KEY)
        expansion = expand(request, registry, max_message_bytes=15360)
        # Round-tripped through JSON, as the worker reads them back from the outbox.
        events.extend(orjson.loads(orjson.dumps(e.payload)) for e in expansion.events)
    return events


def measure(url: str, events: list[dict[str, Any]]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to deliver ``events`` in chunks of CHUNK."""
    destination = DatabaseDestination("warehouse", DatabaseOptions(url=url), CHUNK)
    asyncio.run(destination.start())
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, len(events), CHUNK):
            outcomes = destination._deliver(events[start:start + CHUNK])
            refused = next((outcome for outcome in outcomes if outcome != DELIVERED), None)
            if refused is not None:
                raise SystemExit(f"not delivered: {refused}")
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        asyncio.run(destination.close())


def run_sqlite(events: list[dict[str, Any]], workdir: Path, number: int) -> tuple[float, float]:
    path = workdir / f"warehouse-{number}.sqlite"
    try:
        return measure(f"sqlite:///{path}", events)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_postgres(events: list[dict[str, Any]], admin_url: str, number: int) -> tuple[float, float]:
    name = f"trackrelay_bench_warehouse_{os.getpid()}_{number}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        return measure(libpq_url(admin_url, name), events)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args()
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    events = normalised_events("warehouse", args.events)
    admin_url = libpq_url(args.postgres_url)
    with tempfile.TemporaryDirectory(prefix="bench-warehouse-") as workdir:
        for round_ in range(args.rounds):
            for backend in backends:
                if backend == "sqlite":
                    cpu, wall = run_sqlite(events, Path(workdir), round_)
                else:
                    cpu, wall = run_postgres(events, admin_url, round_)
                print(f"{backend:8} {len(events)} rows: {len(events) / cpu:8.0f} rows/CPU-s "
                      f"({cpu:.3f} CPU-s, {wall:.3f} s wall)", flush=True)


if __name__ == "__main__":
    main()
