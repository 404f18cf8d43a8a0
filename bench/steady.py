"""R8: a worker delivering a decoded backlog to a sink that answers every POST after 50 ms.

The backlog is decoded beforehand (untimed, as R5's) and reset to pending before each row, so
R8 times delivery alone. The rate is steady-state: the sink's counters over a window that
opens ``WARM_UP`` seconds after its first request (the controller's ramp-up is outside it) and
lasts ``--duration`` seconds, or ends earlier when 95% of the backlog has arrived. Rows:

- ``batch_size`` 1 with the adapter's default concurrency (the bench sets none, so whatever
  the default becomes, adaptive or not, is what is measured), target >= 2,000 events/s;
- ``batch_size`` 1, ``concurrency = 64``: a fixed limit, next to its Little's-law bound
  64 / 50 ms = 1,280 requests/s;
- ``batch_size`` 100 with the defaults, target >= 20,000 events/s;
- ``batch_size`` 1 with the defaults against a sink that answers 429 beyond 16 in flight: the
  share of requests answered 429 (< 5%), the sink's time-averaged in flight (>= 0.8 x 16) and
  the rate of answered requests (>= 0.8 x 16 / 50 ms = 256/s).

The worker runs on the server CPU and the sink on the load CPU. When ``trackrelay status
--json`` reports a destination's ``concurrency`` (mode, limit, rtt_ms), it is read at the end
of each window and shown in the notes.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Any

import orjson

from bench.backlog import decoded_backlog, reset_deliveries
from bench.databases import Database
from bench.processes import LOAD_CPUS, SERVER_CPUS, TRACKRELAY, BenchError, Process, clean_env, cpu_list
from bench.report import Figure, Target
from bench.servers import start_worker, write_config
from bench.session import Session
from bench.sinks import ControlledSink, Window, wait_first_request

LATENCY_MS = 50
CAPACITY = 16
WARM_UP = 3.0  # seconds after the sink's first request before the window opens
SAMPLE = 0.25
DESTINATION = "hook"


@dataclass(frozen=True)
class Row:
    label: str
    batch_size: int
    concurrency: int | None = None  # None: the adapter's default
    capacity: int = 0


@dataclass(frozen=True)
class Steady:
    window: Window
    controller: str  # what status --json said of the destination's concurrency


def webhook(url: str, row: Row) -> dict[str, Any]:
    destination: dict[str, Any] = {"name": DESTINATION, "type": "webhook", "url": url, "batch_size": row.batch_size}
    if row.concurrency is not None:
        destination["concurrency"] = row.concurrency
    return destination


def controller_state(config: str, destination: str) -> str:
    """The destination's ``concurrency`` in ``trackrelay status --json``, as text ("" if absent)."""
    argv = ["taskset", "-c", cpu_list(LOAD_CPUS), *TRACKRELAY, "status", "--config", config, "--json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=60)
        found = orjson.loads(done.stdout)["destinations"][destination].get("concurrency")
    except (subprocess.SubprocessError, orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    if not isinstance(found, dict):
        return "" if found is None else f"concurrency {found}"
    parts = [f"{key} {found[key]:.0f}" if isinstance(found[key], float) else f"{key} {found[key]}"
             for key in ("mode", "limit", "rtt_ms") if found.get(key) is not None]
    return " ".join(parts)


def steady_window(sink: ControlledSink, worker: Process, events: int, seconds: float) -> Window:
    """The sink's counters from ``WARM_UP`` s after its first request, for ``seconds`` or until
    95% of ``events`` have arrived (then up to the last sample before that)."""
    first = wait_first_request([sink], worker)
    while sink.stats()["now"] < first + WARM_UP:
        worker.check_alive()
        time.sleep(0.05)
    start = last = sink.stats()
    while last["now"] < start["now"] + seconds:
        worker.check_alive()
        time.sleep(SAMPLE)
        sample = sink.stats()
        if sample["events"] >= 0.95 * events:
            break
        last = sample
    if last["now"] - start["now"] < min(1.0, seconds / 2):
        raise BenchError(f"the backlog of {events} events lasted less than the warm-up: make it bigger")
    return Window.between(start, last)


def deliver(session: Session, database: Database, events: int, row: Row) -> Steady:
    """One row: a fresh sink and worker on the decoded backlog; every delivery is pending again after."""
    try:
        with ControlledSink(session.workdir, LOAD_CPUS, LATENCY_MS, row.capacity) as sink:
            destinations = (webhook(sink.url, row),)
            config = write_config(session.workdir, database, destinations=destinations)
            worker, _ = start_worker(session.workdir, database, destinations, cpus=SERVER_CPUS)
            with worker:
                window = steady_window(sink, worker, events, session.options.duration)
                controller = controller_state(str(config), DESTINATION)
    finally:
        reset_deliveries(database, DESTINATION)
    return Steady(window, controller)


def _note(figure: Figure, run: int, steady: Steady, extra: str = "") -> None:
    w = steady.window
    text = (f"run {run + 1}: {w.seconds:.1f} s window, mean in flight {w.mean_in_flight:.1f}"
            + (f", 429s {w.rejected_share:.1%}" if w.rejected else "") + extra
            + (f", status: {steady.controller}" if steady.controller else ""))
    figure.note = "; ".join(filter(None, [figure.note, text]))


def steady_delivery(session: Session, backend: str) -> list[Figure]:
    duration = session.options.duration
    # Enough for the warm-up and the window at well above each row's target.
    events = max(200_000, int(50_000 * (WARM_UP + duration)))
    single = Row("batch_size 1, default concurrency", 1)
    fixed = Row("batch_size 1, concurrency 64", 1, concurrency=64)
    batched = Row("batch_size 100, default concurrency", 100)
    limited = Row(f"batch_size 1, default concurrency, sink capacity {CAPACITY}", 1, capacity=CAPACITY)
    sink = f"{LATENCY_MS} ms sink"
    r8 = Figure(backend, "R8", f"{sink}, {single.label}, events/s", target=Target("min", 2_000))
    r8_fixed = Figure(backend, "R8", f"{sink}, {fixed.label}, events/s (vs 64 / {LATENCY_MS} ms)")
    r8_batched = Figure(backend, "R8", f"{sink}, {batched.label}, events/s", target=Target("min", 20_000))
    r8_429 = Figure(backend, "R8", f"{sink}, capacity {CAPACITY}: requests answered 429, %",
                    target=Target("max", 5, "%"))
    r8_in_flight = Figure(backend, "R8", f"{sink}, capacity {CAPACITY}: mean in flight at the sink (vs {CAPACITY})",
                          target=Target("ratio", 0.8))
    r8_answered = Figure(backend, "R8",
                         f"{sink}, capacity {CAPACITY}: answered req/s (vs {CAPACITY} / {LATENCY_MS} ms)",
                         target=Target("ratio", 0.8))
    database = decoded_backlog(session, backend, events, "r8", (webhook("http://127.0.0.1:9/in", Row("", 1)),))
    try:
        for run in range(session.options.runs):
            got = deliver(session, database, events, single)
            r8.values.append(got.window.events_per_second)
            _note(r8, run, got)
            got = deliver(session, database, events, fixed)
            r8_fixed.values.append(got.window.events_per_second)
            r8_fixed.ceilings.append(64 / (LATENCY_MS / 1000))
            _note(r8_fixed, run, got)
            got = deliver(session, database, events, batched)
            r8_batched.values.append(got.window.events_per_second)
            _note(r8_batched, run, got)
            got = deliver(session, database, events, limited)
            w = got.window
            r8_429.values.append(100 * w.rejected_share)
            r8_in_flight.values.append(w.mean_in_flight)
            r8_in_flight.ceilings.append(CAPACITY)
            r8_answered.values.append(w.answered_per_second)
            r8_answered.ceilings.append(CAPACITY / (LATENCY_MS / 1000))
            _note(r8_429, run, got, f", {w.requests} requests")
            session.say(f"{backend} R8 run {run + 1}: bs1 {r8.values[-1]:,.0f}, c64 {r8_fixed.values[-1]:,.0f}, "
                        f"bs100 {r8_batched.values[-1]:,.0f} events/s; capacity {CAPACITY}: "
                        f"429s {w.rejected_share:.1%}, in flight {w.mean_in_flight:.1f}, "
                        f"{w.answered_per_second:,.0f} answered/s")
    finally:
        session.databases.drop(database)
    return [r8, r8_fixed, r8_batched, r8_429, r8_in_flight, r8_answered]
