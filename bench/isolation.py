"""R10: isolation between destinations. One worker delivers a decoded backlog to three webhook
destinations (``batch_size`` 1, ``timeout_seconds`` 1, default concurrency), each with a sink
of its own answering at once. The figure is the delivery rate of the two healthy ones (events/s
at sinks a and b together) while the third is down, over the same rate with all three up.

The third is down in three ways, one row each: its port refuses connections (nothing listens
on it), its sink never answers (every request times out after 1 s), or its sink answers 500.
The rate is steady-state, as R8's: the sinks' counters over ``--duration`` seconds from
``WARM_UP`` s after the first request. All three up is measured before and after each way
down, and that way's ceiling is the mean of the two. The backlog is decoded beforehand (untimed) and reset
to pending before each measurement. The worker runs on the server CPU, the sinks on the load CPU.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from bench.backlog import decoded_backlog, reset_deliveries
from bench.databases import Database
from bench.processes import LOAD_CPUS, SERVER_CPUS, BenchError, free_port
from bench.report import Figure, Target
from bench.servers import start_worker
from bench.session import Session
from bench.sinks import ControlledSink, Window, wait_first_request

NAMES = ("hook-a", "hook-b", "hook-c")
WARM_UP = 2.0
TIMEOUT_SECONDS = 1.0
# How the third destination is down: sink options, or None for a port nobody listens on.
DOWN: dict[str, dict[str, Any] | None] = {
    "connection refused": None,
    f"no answer ({TIMEOUT_SECONDS:g} s timeout)": {"never_answer": True},
    "500s": {"status": 500},
}


def _webhook(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": url, "batch_size": 1, "timeout_seconds": TIMEOUT_SECONDS}


def healthy_rate(session: Session, database: Database, events: int, down: dict[str, Any] | str | None) -> float:
    """Events/s at sinks a and b; ``down`` is "up" (all three healthy) or how the third is down."""
    try:
        with ExitStack() as stack:
            sinks = [stack.enter_context(ControlledSink(session.workdir, LOAD_CPUS)) for _ in range(2)]
            if down is None:
                third = f"http://127.0.0.1:{free_port()}/in"  # nothing listens there
            else:
                options = {} if down == "up" else down
                third = stack.enter_context(ControlledSink(session.workdir, LOAD_CPUS, **options)).url
            destinations = tuple(_webhook(name, url) for name, url in zip(NAMES, [s.url for s in sinks] + [third]))
            worker, _ = start_worker(session.workdir, database, destinations, cpus=SERVER_CPUS)
            with worker:
                first = wait_first_request(sinks, worker)
                while sinks[0].stats()["now"] < first + WARM_UP:
                    worker.check_alive()
                    time.sleep(0.05)
                start = [s.stats() for s in sinks]
                time.sleep(session.options.duration)
                worker.check_alive()
                end = [s.stats() for s in sinks]
    finally:
        for name in NAMES:
            reset_deliveries(database, name)
    windows = [Window.between(a, b) for a, b in zip(start, end)]
    if any(b["events"] >= 0.95 * events for b in end):
        raise BenchError(f"a healthy sink got 95% of the {events}-event backlog within the window: make it bigger")
    return sum(w.events_per_second for w in windows)


def isolation(session: Session, backend: str) -> list[Figure]:
    # Room for 8,000 events/s to each healthy sink (5,400 each seen with all three up).
    events = max(20_000, int(8_000 * (WARM_UP + session.options.duration) * 1.5))
    figures = {how: Figure(backend, "R10", f"2 healthy webhooks, events/s, 3rd {how} (vs all 3 up)",
                           target=Target("ratio", 0.9)) for how in DOWN}
    database = decoded_backlog(session, backend, events, "r10",
                               tuple(_webhook(name, "http://127.0.0.1:9/in") for name in NAMES))
    try:
        for run in range(session.options.runs):
            # All up before and after each way down: its ceiling is the mean of the two, so a
            # machine that slows down or speeds up during the run moves both sides alike.
            ups = [healthy_rate(session, database, events, "up")]
            for how, options in DOWN.items():
                figures[how].values.append(healthy_rate(session, database, events, options))
                ups.append(healthy_rate(session, database, events, "up"))
                figures[how].ceilings.append((ups[-2] + ups[-1]) / 2)
            session.say(f"{backend} R10 run {run + 1}: all up " + "/".join(f"{u:,.0f}" for u in ups) + " events/s; "
                        + ", ".join(f"{how} {f.values[-1]:,.0f}" for how, f in figures.items()))
    finally:
        session.databases.drop(database)
    return list(figures.values())
