"""R9's worker half, alone: a real ``trackrelay worker`` drains a decoded backlog fanned out to
R9's three destinations (webhook ``batch_size`` 100 to a sink answering at once, ``file``,
``database``), with no receiver and no decoding. It prints deliveries/s and deliveries per
second of the worker's own CPU (user + system, from /proc): on this shared 2-core VM the
second moves far less with the neighbours' load than the first, so compare that one between
commits, alternating runs.

    python -m bench.fanout_drain [--backend sqlite|postgres] [--events 50000] [--runs 3] [--only hook,file]

Not a figure of ``python -m bench``: a diagnostic for the per-delivery cost R9 is bound by
(bench/RESULTS.md, "R9: where the time goes").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from pipeline.schema import deliveries

from bench.backlog import decoded_backlog, open_store
from bench.databases import DEFAULT_POSTGRES_URL, Databases
from bench.console_cost import cpu_seconds
from bench.fanout import DESTINATIONS, _destinations, drop_destinations
from bench.processes import LOAD_CPUS, BenchError, Process
from bench.servers import start_worker
from bench.session import Options, Session
from bench.sinks import ControlledSink

def _wait_all_delivered(database: object, worker: Process, expected: int, timeout: float) -> None:
    store = open_store(database)  # type: ignore[arg-type]
    delivered = select(func.count()).select_from(deliveries).where(deliveries.c.state == "delivered")
    deadline = time.monotonic() + timeout
    try:
        while True:
            worker.check_alive()
            with store.engine.connect().execution_options(readonly=True) as conn:
                if conn.execute(delivered).scalar_one() >= expected:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"the worker did not deliver {expected} in {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        store.dispose()


def finish_times(database: object, since_ms: int) -> dict[str, float]:
    """Seconds from ``since_ms`` to each destination's last delivery: how fairly they were served."""
    store = open_store(database)  # type: ignore[arg-type]
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(select(deliveries.c.destination, func.max(deliveries.c.finished_at_ms))
                                .group_by(deliveries.c.destination)).all()
    finally:
        store.dispose()
    return {name: (last - since_ms) / 1000 for name, last in rows}


def one_drain(session: Session, backend: str, events: int, tag: str,
              only: tuple[str, ...] = DESTINATIONS) -> tuple[float, float]:
    """(deliveries/s, deliveries per worker CPU-second) for one drain of a fresh backlog to the
    destinations named ``only`` (R9's three by default)."""
    with ControlledSink(session.workdir, LOAD_CPUS) as sink:
        every, warehouse = _destinations(session, backend, sink.url, tag)
        destinations = tuple(d for d in every if d["name"] in only)
        database = decoded_backlog(session, backend, events, tag, destinations)
        try:
            worker, _ = start_worker(session.workdir, database, destinations)
            with worker:
                started, started_ms, cpu_before = time.monotonic(), int(time.time() * 1000), cpu_seconds(worker.pid)
                _wait_all_delivered(database, worker, events * len(destinations), 120 + events / 100)
                wall, cpu = time.monotonic() - started, cpu_seconds(worker.pid) - cpu_before
            finished = finish_times(database, started_ms)
            session.say("last delivery after: " + ", ".join(f"{name} {seconds:.1f} s"
                                                            for name, seconds in sorted(finished.items())))
        finally:
            session.databases.drop(database)
            drop_destinations(session, warehouse, tag)
    total = events * len(destinations)
    return total / wall, total / cpu


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_drain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--only", default=",".join(DESTINATIONS), metavar="NAMES",
                        help=f"some of {','.join(DESTINATIONS)} (default: all three)")
    args = parser.parse_args()
    if not args.only or set(args.only.split(",")) - set(DESTINATIONS):
        parser.error(f"--only takes some of {','.join(DESTINATIONS)}, got {args.only!r}")
    with tempfile.TemporaryDirectory(prefix="trackrelay-fanout-drain-") as workdir:
        session = Session(Options(runs=args.runs), Path(workdir), Databases(Path(workdir), args.postgres_url))
        rates, per_cpu = [], []
        for run in range(args.runs):
            rate, cpu = one_drain(session, args.backend, args.events, f"fd-{run}", tuple(args.only.split(",")))
            rates.append(rate)
            per_cpu.append(cpu)
            session.say(f"{args.backend} run {run + 1}: {rate:,.0f} deliveries/s, {cpu:,.0f} per worker CPU-second")
        print(f"{args.backend}: {args.events:,} events to {args.only}: median {statistics.median(rates):,.0f} "
              f"deliveries/s, {statistics.median(per_cpu):,.0f} deliveries per worker CPU-second "
              f"(runs: {', '.join(f'{r:,.0f}/{c:,.0f}' for r, c in zip(rates, per_cpu))})")


if __name__ == "__main__":
    main()
