"""R4, R5 and R7's worker half: a real ``trackrelay worker`` draining a backlog.

R4 and R7 time the worker from its "started" log line to the ``finished_at_ms`` of the last
delivery, so decoding, fan-out and delivery are all inside the figure and process start-up is
not. R5 decodes the backlog beforehand (untimed) and times delivery alone, at the sink: from
its first request to its last, over ``--duration`` seconds (or the whole backlog if sooner).
"""

from __future__ import annotations

import time
from typing import Any

from bench.backlog import decoded_backlog, fill_outbox, reset_deliveries, wait_drained
from bench.databases import Database
from bench.load import run_wrk
from bench.messages import delivered_event_body
from bench.processes import LOAD_CPUS, SERVER_CPUS, BenchError, Process, RssSampler
from bench.report import Figure, Target
from bench.servers import Sink, start_worker
from bench.session import Session

NULL = ({"name": "null", "type": "null"},)
R4_EVENTS = 100_000
CONCURRENCY = 8


def drain_timeout(events: int) -> float:
    return 120 + events / 500  # a drain slower than 500 events/s is a failure worth stopping


def timed_drain(session: Session, backend: str, events: int, tag: str) -> tuple[float, float]:
    """Fill a fresh database with ``events``, drain it to the null destination; (events/s, peak RSS MB)."""
    database = session.databases.create(backend)
    try:
        fill_outbox(database, events, tag)
        worker, started = start_worker(session.workdir, database, NULL)
        with worker, RssSampler(worker.pid) as rss:
            finished = wait_drained(database, "null", events, worker, drain_timeout(events))
        return events / (finished - started), rss.peak_mb
    finally:
        session.databases.drop(database)


def pipeline_drain(session: Session, backend: str) -> list[Figure]:
    """R4: decode + fan-out + deliver to ``null`` from a 100k backlog, next to R1 and R3.

    Its ratio to raw claim-and-acknowledge (``bench.raw claims``, target 0.4) is retired (issue
    14): trackrelay keeps one delivery row per event and destination by design, which a queue
    of bare rows does not pay for; R9 (ingest and a three-way fan-out at once) is the figure
    that says whether that design is fast enough. The drain rate and its comparisons with R1
    (>= 1) and R3 (stretch >= 1) stay.
    """
    r4 = Figure(backend, "R4", "drain 100k to null, events/s",
                note="ratio to raw claim+ack retired (issue 14; see R9)")
    for run in range(session.options.runs):
        rate, _ = timed_drain(session, backend, R4_EVENTS, f"r4-{run}")
        r4.values.append(rate)
        session.say(f"{backend} R4 run {run + 1}: {rate:,.0f} events/s")
    figures = [r4]
    for name, target in (("R1", Target("ratio", 1.0)), ("R3", Target("ratio", 1.0, stretch=True))):
        compared = Figure(backend, "R4", f"R4 drain rate vs {name} ingest rate", values=list(r4.values), target=target)
        if (backend, name) in session.facts:
            compared.ceilings = list(session.facts[(backend, name)])
        else:
            compared.target, compared.note = None, f"run {name} too to compare"
        figures.append(compared)
    return figures


def _webhook(url: str, batch_size: int) -> dict[str, Any]:
    return {"name": "hook", "type": "webhook", "url": url, "batch_size": batch_size, "concurrency": CONCURRENCY}


def _decoded_backlog(session: Session, backend: str, events: int, batch_size: int, tag: str) -> Database:
    """A fresh database holding ``events`` pending webhook deliveries, decoded here (untimed)."""
    return decoded_backlog(session, backend, events, tag, (_webhook("http://127.0.0.1:9/in", batch_size),))


def _delivered_at_sink(sink: Sink, worker: Process, events: int, seconds: float) -> None:
    """Wait until the sink has every event, or has been receiving for ``seconds``."""
    deadline = time.monotonic() + drain_timeout(events)
    while True:
        worker.check_alive()
        stats = sink.stats()
        if stats["events"] >= events or (stats["first"] is not None and time.monotonic() - stats["first"] >= seconds):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the sink got {stats['events']} of {events} events in {drain_timeout(events):.0f} s")
        time.sleep(0.1)


def webhook_rate(session: Session, database: Database, events: int, batch_size: int) -> float:
    """Deliver the decoded backlog to a fresh sink for ``duration`` seconds (or until it is
    all delivered); events/s at the sink, from its first request to its last. Afterwards every
    delivery is made pending again for the next run."""
    try:
        with Sink(session.workdir, cpus=SERVER_CPUS) as sink:
            # The worker is the load generator here: it gets the load CPU, the sink the server CPU.
            worker, _ = start_worker(session.workdir, database, (_webhook(sink.url, batch_size),), cpus=LOAD_CPUS)
            with worker:
                _delivered_at_sink(sink, worker, events, session.options.duration)
            stats = sink.stats()  # the worker has stopped: its last batch is in
    finally:
        reset_deliveries(database, "hook")
    if stats["events"] < 2:
        raise BenchError(f"the sink got {stats['events']} events")
    return stats["events"] / (stats["last"] - stats["first"])


def webhook_delivery(session: Session, backend: str) -> list[Figure]:
    options = session.options
    # Enough for `duration` seconds at the sink's capacity (batch_size 1) or at 10k events/s.
    single_events, batch_events = int(4000 * options.duration), int(10000 * options.duration)
    r5 = Figure(backend, "R5", f"webhook batch_size 1, events/s (vs sink under wrk -c{CONCURRENCY})",
                target=Target("ratio", 0.7))
    r5b = Figure(backend, "R5", "webhook batch_size 100, events/s", target=Target("min", 10_000))
    body = session.body_file("event", delivered_event_body())
    single = _decoded_backlog(session, backend, single_events, 1, "r5")
    try:
        batched = _decoded_backlog(session, backend, batch_events, 100, "r5b")
    except BaseException:
        session.databases.drop(single)
        raise
    try:
        for run in range(options.runs):
            r5.values.append(webhook_rate(session, single, single_events, 1))
            r5b.values.append(webhook_rate(session, batched, batch_events, 100))
            with Sink(session.workdir, cpus=SERVER_CPUS) as sink:
                r5.ceilings.append(run_wrk(sink.url, body, options.duration, CONCURRENCY).rate)
            session.say(f"{backend} R5 run {run + 1}: {r5.values[-1]:,.0f} events/s vs sink {r5.ceilings[-1]:,.0f}; "
                        f"batch_size 100: {r5b.values[-1]:,.0f} events/s")
    finally:
        session.databases.drop(single)
        session.databases.drop(batched)
    return [r5, r5b]


def big_backlog(session: Session, backend: str) -> list[Figure]:
    """R7's worker half: RSS while draining a big backlog, and its rate vs a 10k backlog."""
    big = 1_000_000 if session.options.big else 200_000
    label = f"{big // 1000}k" if big < 1_000_000 else "1M"
    note = "" if session.options.big else "200k backlog; --big for the issue's 1M"
    rss = Figure(backend, "R7", f"worker RSS draining {label}, MB", target=Target("max", 200, "MB"), note=note)
    rate = Figure(backend, "R7", f"drain {label}, events/s (vs a 10k backlog)", target=Target("ratio", 0.8),
                  note=note)
    for run in range(session.options.runs):
        big_rate, peak = timed_drain(session, backend, big, f"r7-{run}")
        small_rate, _ = timed_drain(session, backend, 10_000, f"r7s-{run}")
        rss.values.append(peak)
        rate.values.append(big_rate)
        rate.ceilings.append(small_rate)
        session.say(f"{backend} R7 run {run + 1}: {label} at {big_rate:,.0f} events/s (RSS {peak:.0f} MB), "
                    f"10k at {small_rate:,.0f} events/s")
    return [rss, rate]
