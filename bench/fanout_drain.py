"""R9's worker half, alone: a real ``trackrelay worker`` drains a decoded backlog fanned out to
R9's three destinations (webhook ``batch_size`` 100 to a sink answering at once, ``file``,
``database``), with no receiver and no decoding. It prints deliveries/s and deliveries per
second of the worker's own CPU (user + system, from /proc): on this shared 2-core VM the
second moves far less with the neighbours' load than the first, so compare that one between
commits, alternating runs.

    python -m bench.fanout_drain [--backend sqlite|postgres] [--events 50000] [--runs 3]

Not a figure of ``python -m bench``: a diagnostic for the per-delivery cost R9 is bound by
(bench/RESULTS.md, "R9: where the time goes").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from pipeline.schema import deliveries

from bench.backlog import decoded_backlog, open_store
from bench.databases import DEFAULT_POSTGRES_URL, Databases
from bench.fanout import DESTINATIONS, _destinations
from bench.processes import LOAD_CPUS, BenchError, Process
from bench.servers import start_worker
from bench.session import Options, Session
from bench.sinks import ControlledSink

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def _wait_all_delivered(database: object, worker: Process, expected: int, timeout: float) -> None:
    store = open_store(database)  # type: ignore[arg-type]
    delivered = select(func.count()).select_from(deliveries).where(
        deliveries.c.destination.in_(DESTINATIONS), deliveries.c.state == "delivered")
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


def one_drain(session: Session, backend: str, events: int, tag: str) -> tuple[float, float]:
    """(deliveries/s, deliveries per worker CPU-second) for one drain of a fresh backlog."""
    with ControlledSink(session.workdir, LOAD_CPUS) as sink:
        destinations, warehouse = _destinations(session, backend, sink.url, tag)
        database = decoded_backlog(session, backend, events, tag, destinations)
        try:
            worker, _ = start_worker(session.workdir, database, destinations)
            with worker:
                started, cpu_before = time.monotonic(), cpu_seconds(worker.pid)
                _wait_all_delivered(database, worker, events * len(DESTINATIONS), 120 + events / 100)
                wall, cpu = time.monotonic() - started, cpu_seconds(worker.pid) - cpu_before
        finally:
            session.databases.drop(database)
            if warehouse is not None:
                session.databases.drop(warehouse)
            shutil.rmtree(session.workdir / f"files-{tag}", ignore_errors=True)
            (session.workdir / f"warehouse-{tag}.sqlite").unlink(missing_ok=True)
    total = events * len(DESTINATIONS)
    return total / wall, total / cpu


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_drain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trackrelay-fanout-drain-") as workdir:
        session = Session(Options(runs=args.runs), Path(workdir), Databases(Path(workdir), args.postgres_url))
        rates, per_cpu = [], []
        for run in range(args.runs):
            rate, cpu = one_drain(session, args.backend, args.events, f"fd-{run}")
            rates.append(rate)
            per_cpu.append(cpu)
            session.say(f"{args.backend} run {run + 1}: {rate:,.0f} deliveries/s, {cpu:,.0f} per worker CPU-second")
        print(f"{args.backend}: {args.events:,} events x {len(DESTINATIONS)}: median {statistics.median(rates):,.0f} "
              f"deliveries/s, {statistics.median(per_cpu):,.0f} deliveries per worker CPU-second "
              f"(runs: {', '.join(f'{r:,.0f}/{c:,.0f}' for r, c in zip(rates, per_cpu))})")


if __name__ == "__main__":
    main()
