"""The worker's concurrency controllers, as other processes see them: each worker writes its
destinations' current limit, round-trip time and requests in flight to ``delivery_controllers``
every few seconds, and ``trackrelay status``, the console and ``/metrics`` read them there.

Several workers (Postgres) each run their own controller per destination: status shows their
sum (limit, in flight) and the mean of their round trips, and how many workers reported. A row
older than :data:`STALE_MS` belongs to a worker that died without removing it and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select

from pipeline.destinations.concurrency import Snapshot
from pipeline.schema import delivery_controllers
from pipeline.store import Store

PUBLISH_SECONDS = 2.0
STALE_MS = 15_000


@dataclass(frozen=True)
class ControllerStatus:
    mode: str  # adaptive | fixed (mixed: workers configured differently, mid-reload)
    limit: int
    max_concurrency: int
    in_flight: int
    rtt_ms: float | None
    baseline_rtt_ms: float | None
    workers: int


def publish(store: Store, worker: str, snapshots: Mapping[str, Snapshot], now_ms: int) -> None:
    """Replace this worker's rows with ``snapshots`` (one transaction: readers never see half)."""
    rows = [{"destination": name, "worker": worker, "mode": s.mode, "concurrency_limit": s.limit,
             "max_concurrency": s.max_concurrency, "in_flight": s.in_flight, "rtt_ms": s.rtt_ms,
             "baseline_rtt_ms": s.baseline_rtt_ms, "updated_at_ms": now_ms} for name, s in snapshots.items()]
    with store.engine.begin() as conn:
        conn.execute(delete(delivery_controllers).where(delivery_controllers.c.worker == worker))
        if rows:
            conn.execute(insert(delivery_controllers), rows)


def withdraw(store: Store, worker: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(delete(delivery_controllers).where(delivery_controllers.c.worker == worker))


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def read_controllers(conn: Connection, now_ms: int) -> dict[str, ControllerStatus]:
    """Each destination's controllers, summed over the workers that reported recently."""
    table = delivery_controllers.c
    rows = conn.execute(select(table.destination, table.mode, table.concurrency_limit, table.max_concurrency,
                               table.in_flight, table.rtt_ms, table.baseline_rtt_ms)
                        .where(table.updated_at_ms >= now_ms - STALE_MS)).all()
    by_destination: dict[str, list[tuple]] = {}
    for row in rows:
        by_destination.setdefault(row[0], []).append(tuple(row))
    found = {}
    for name, entries in by_destination.items():
        modes = {e[1] for e in entries}
        found[name] = ControllerStatus(mode=modes.pop() if len(modes) == 1 else "mixed",
                                       limit=sum(e[2] for e in entries), max_concurrency=sum(e[3] for e in entries),
                                       in_flight=sum(e[4] for e in entries), rtt_ms=_mean([e[5] for e in entries]),
                                       baseline_rtt_ms=_mean([e[6] for e in entries]), workers=len(entries))
    return found
