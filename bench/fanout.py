"""R9: batch ingest and delivery at once. ``trackrelay serve`` takes ``/v1/batch`` (100 events a
request) offered at a fixed rate by ``bench.pacer`` while ``trackrelay worker`` fans every event
out to three destinations: a webhook (``batch_size`` 100) to a sink answering at once, a
``file`` destination and a ``database`` destination (a SQLite file, or a Postgres database on
the Postgres backend). Receiver and worker share the server CPU; pacer and sink the load CPU.

A step offers one rate for ``--window`` seconds (60 by default) on a fresh database. Its
backlog, sampled every second from the database, is what the worker still owes: 3 x 100 x the
outbox rows not decoded yet, plus the pending deliveries of the three destinations. The step
passes when the pacer got 200s for 97% of the requests the rate asked for, none failed, and
the backlog is not growing: its mean over the window's last third exceeds its mean over the
first third by less than 2% of the offered deliveries per second, times the 2/3 window
between the two thirds' midpoints. A step with any delivery dead (or otherwise neither
pending nor delivered) is an error, not a pass. Rates rise by doubling from 5,000 events/s until a step
fails, then two bisections between the highest pass and the lowest fail; the figure is the
highest rate that passed, next to R3 (batch ingest alone) of the same bench run, or measured
here when R3 was not asked for.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import func, select

from pipeline.schema import deliveries, outbox

from bench.backlog import PER_REQUEST, open_store
from bench.databases import Database
from bench.ingest import receiver_run
from bench.load import post_checked
from bench.messages import AUTHORIZATION, batch_body
from bench.processes import LOAD_CPUS, BenchError, cpu_list
from bench.report import Figure, Target
from bench.servers import start_receiver, start_worker
from bench.session import Session
from bench.sinks import ControlledSink

DESTINATIONS = ("hook", "file", "warehouse")
START = 5_000  # events/s
HIGHEST = 160_000
BISECTIONS = 2
GROWTH = 0.02  # of the offered deliveries/s
DELIVERED = 0.97  # of the requests the rate asks for, answered 200
CONNECTIONS = 32


def window_seconds(session: Session) -> float:
    # bench.cli's options carry --window; plain Options (session.py) do not have it yet.
    return float(getattr(session.options, "window", 60.0))


@dataclass
class Step:
    rate: float  # offered events/s
    passed: bool
    why: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic s, backlog)
    # Where the backlog was when the pacer stopped: which destination (or the decoder) lags.
    left: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        left = ", ".join(f"{name} {count:,}" for name, count in self.left.items() if count)
        return f"{self.rate / 1000:g}k {'ok' if self.passed else 'no'} ({self.why}" + (
            f"; pending at the end: {left})" if left and not self.passed else ")")


def _destinations(session: Session, backend: str, sink_url: str, tag: str) -> tuple[tuple[dict[str, Any], ...],
                                                                                   Database | None]:
    warehouse = session.databases.create("postgres") if backend == "postgres" else None
    url = warehouse.url if warehouse else f"sqlite:///{session.workdir / f'warehouse-{tag}.sqlite'}"
    return ({"name": "hook", "type": "webhook", "url": sink_url, "batch_size": 100},
            {"name": "file", "type": "file", "path": str(session.workdir / f"files-{tag}")},
            {"name": "warehouse", "type": "database", "url": url, "table_prefix": "wh_"}), warehouse


OUTBOX_PENDING = select(func.count()).select_from(outbox).where(outbox.c.state == "pending")
DELIVERIES_PENDING = select(func.count()).select_from(deliveries).where(
    deliveries.c.destination.in_(DESTINATIONS), deliveries.c.state == "pending")


def _outbox_pending(store: Any) -> int:
    with store.engine.connect().execution_options(readonly=True) as conn:
        return conn.execute(OUTBOX_PENDING).scalar_one()


def backlog(store: Any) -> int:
    """Deliveries the worker still owes: undecoded outbox rows (x 100 events x 3) and pending deliveries."""
    with store.engine.connect().execution_options(readonly=True) as conn:
        rows = conn.execute(OUTBOX_PENDING).scalar_one()
        pending = conn.execute(DELIVERIES_PENDING).scalar_one()
    return rows * PER_REQUEST * len(DESTINATIONS) + pending


def pending_by_destination(store: Any) -> dict[str, int]:
    with store.engine.connect().execution_options(readonly=True) as conn:
        rows = conn.execute(select(deliveries.c.destination, func.count()).where(
            deliveries.c.destination.in_(DESTINATIONS), deliveries.c.state == "pending")
            .group_by(deliveries.c.destination)).all()
    return {name: count for name, count in rows}


def check_outcomes(store: Any) -> None:
    """A step whose deliveries went dead would look bounded while delivering nothing: refuse it."""
    with store.engine.connect().execution_options(readonly=True) as conn:
        failed = conn.execute(select(deliveries.c.destination, deliveries.c.state, func.count())
                              .where(deliveries.c.state.not_in(["pending", "delivered"]))
                              .group_by(deliveries.c.destination, deliveries.c.state)).all()
    if failed:
        raise BenchError("deliveries neither pending nor delivered: "
                         + ", ".join(f"{name} {state} {count}" for name, state, count in failed))


def judge(step: Step, count: dict[str, Any], window: float) -> None:
    asked = step.rate / PER_REQUEST * window
    if count["failed"] or count["answered"] < DELIVERED * asked:
        step.passed, step.why = False, f"{count['answered']} of {asked:.0f} requests answered 200"
        return
    start, stop = count["started"], count["stopped"]
    first = [b for t, b in step.samples if t < start + window / 3]
    last = [b for t, b in step.samples if t >= start + 2 * window / 3 and t <= stop + 1]
    if not first or not last:
        step.passed, step.why = False, "too few backlog samples"
        return
    growth = (statistics.mean(last) - statistics.mean(first)) / (2 * window / 3)
    allowed = GROWTH * step.rate * len(DESTINATIONS)
    step.passed = growth <= allowed
    step.why = f"backlog {statistics.mean(first):,.0f} -> {statistics.mean(last):,.0f}, {growth:+,.0f}/s"


def offer(session: Session, backend: str, rate: float, tag: str) -> Step:
    """One step: ``rate`` events/s offered for the window, on fresh processes and databases."""
    window = window_seconds(session)
    step = Step(rate, False, "")
    database = session.databases.create(backend)
    warehouse = None
    try:
        with ControlledSink(session.workdir, LOAD_CPUS) as sink:
            destinations, warehouse = _destinations(session, backend, sink.url, tag)
            receiver, port = start_receiver(session.workdir, database)
            with receiver:
                worker, _ = start_worker(session.workdir, database, destinations)
                with worker:
                    post_checked(port, "/v1/batch", batch_body(f"{tag}-warm", 0), AUTHORIZATION, 1)
                    count = _paced(session, port, rate, window, tag, step, database, [receiver, worker])
        judge(step, count, window)
        return step
    finally:
        session.databases.drop(database)
        drop_destinations(session, warehouse, tag)


def drop_destinations(session: Session, warehouse: Database | None, tag: str) -> None:
    """Remove what _destinations made for ``tag``: the warehouse database, the files."""
    if warehouse is not None:
        session.databases.drop(warehouse)
    shutil.rmtree(session.workdir / f"files-{tag}", ignore_errors=True)
    (session.workdir / f"warehouse-{tag}.sqlite").unlink(missing_ok=True)


def _paced(session: Session, port: int, rate: float, window: float, tag: str, step: Step, database: Database,
           servers: list[Any]) -> dict[str, Any]:
    argv = ["taskset", "-c", cpu_list(LOAD_CPUS), sys.executable, "-m", "bench.pacer", "--port", str(port),
            "--tag", tag, "--rate", str(rate / PER_REQUEST), "--seconds", str(window),
            "--connections", str(CONNECTIONS), "--authorization", AUTHORIZATION]
    store = open_store(database)
    try:
        pacer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while pacer.poll() is None:
                for server in servers:
                    server.check_alive()
                step.samples.append((time.monotonic(), backlog(store)))
                time.sleep(1.0)
            out, err = pacer.communicate(timeout=60)
            step.left = {"outbox rows": _outbox_pending(store), **pending_by_destination(store)}
            check_outcomes(store)
        finally:
            if pacer.poll() is None:
                pacer.kill()
                pacer.wait()
    finally:
        store.dispose()
    if pacer.returncode != 0:
        raise BenchError(f"bench.pacer failed: {err.strip()[-1000:]}")
    return orjson.loads(out)


def search(session: Session, backend: str, run: int) -> tuple[float, list[Step]]:
    """The highest offered rate that passed (0 if none), and every step tried."""
    steps: list[Step] = []

    def tried(rate: float) -> bool:
        step = offer(session, backend, rate, f"r9-{run}-{len(steps)}")
        steps.append(step)
        session.say(f"{backend} R9 run {run + 1}: {step.text()}")
        return step.passed

    rate, best, worst = float(START), 0.0, 0.0
    while rate <= HIGHEST:
        if tried(rate):
            best = rate
            if worst:
                break
            rate *= 2
        else:
            worst = rate
            if best or rate <= START / 4:
                break
            rate /= 2
    for _ in range(BISECTIONS if best and worst else 0):
        middle = round((best + worst) / 2, -2)
        if tried(middle):
            best = middle
        else:
            worst = middle
    return best, steps


def sustained_fanout(session: Session, backend: str) -> list[Figure]:
    window = window_seconds(session)
    figure = Figure(backend, "R9", f"/v1/batch offered while fanning out x3, events/s held {window:g} s (vs R3)",
                    target=Target("min", 15_000))
    known = session.facts.get((backend, "R3"))
    for run in range(session.options.runs):
        best, steps = search(session, backend, run)
        figure.values.append(best)
        if known:
            figure.ceilings.append(known[run % len(known)])
        else:
            alone = receiver_run(session, backend, "/v1/batch", batch_body("r9-r3", 0))
            figure.ceilings.append(alone.wrk.rate * PER_REQUEST)
        figure.note = "; ".join(filter(None, [figure.note, f"run {run + 1}: " + ", ".join(s.text() for s in steps)]))
        session.say(f"{backend} R9 run {run + 1}: held {best:,.0f} events/s ({3 * best:,.0f} deliveries/s); "
                    f"R3 {figure.ceilings[-1]:,.0f}")
    return [figure]
