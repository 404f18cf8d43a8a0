"""``python -m bench``: run the chosen figures on the chosen backends and print one table."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import drain, fanout, ingest, isolation, latency, steady
from bench.databases import DEFAULT_POSTGRES_URL, Databases
from bench.load import require_wrk
from bench.processes import LOAD_CPUS, ROOT, SERVER_CPUS, cpu_list
from bench.report import Figure, markdown_table, text_table
from bench.session import Options, Session

FIGURES = ("R1", "R2", "R3", "R4", "R5", "R6", "R7", "R8", "R9", "R10")
DESCRIPTION = """\
Measure trackrelay's figures (issues 4 and 14) next to ceilings measured in the same run, and print
one table: figure, value (median of the runs), ceiling, ratio, target, PASS/FAIL.

  R1  single-event POST /v1/track, req/s        vs a Tornado hello-world app         >= 0.8
  R2  R1 with synchronous=FULL                  vs R1 with synchronous=NORMAL         >= 0.9
  R3  /v1/batch (100 a request), events/s       vs raw inserts, 100 per transaction  >= 0.6
  R4  worker drain of a 100k backlog to null, events/s: vs R1 >= 1, vs R3 stretch >= 1
      (its ratio to raw claim-and-ack is retired, issue 14: R9 judges the delivery-row design)
  R5  webhook delivery, batch_size 1            vs the sink under wrk -c8            >= 0.7
      and batch_size 100                                                  >= 10k events/s
  R6  end-to-end latency at half the sustained end-to-end rate    p50 <= 50, p99 <= 500 ms
  R7  receiver RSS under load <= 100 MB; worker RSS draining a big backlog <= 200 MB;
      big backlog drain rate vs a 10k backlog >= 0.8
  R8  webhook delivery to a sink answering after 50 ms, steady events/s: batch_size 1 with
      default concurrency >= 2,000; concurrency 64 (vs 64 / 50 ms); batch_size 100 >= 20,000;
      to a sink answering 429 beyond 16 in flight: 429s < 5%, mean in flight >= 0.8 x 16,
      answered req/s >= 0.8 x 16 / 50 ms
  R9  /v1/batch offered at a fixed rate while the worker fans out to webhook, file and
      database: the highest rate whose backlog stays bounded for --window s >= 15,000 events/s
      (45,000 deliveries/s), next to R3
  R10 two healthy webhooks' delivery rate with a third down (connection refused, no answer,
      500s) vs all three up                                                >= 0.9

Servers are pinned to one CPU and the load generator (wrk, bench.pacer, the sinks of R8-R10)
to another. Needs wrk (apt-get install wrk) and, for --backend postgres/both, a Postgres it
may create databases on.
"""


@dataclass(frozen=True)
class BenchOptions(Options):
    """Options with R9's window (kept here until session.Options takes it)."""

    window: float = 60.0  # seconds each offered rate must hold in R9


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", nargs="+", metavar="FIGURE", choices=["all", *FIGURES],
                        help="all, or one or more of R1 ... R10")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--duration", type=float, default=5.0, metavar="SECONDS",
                        help="per wrk run, and R8's and R10's steady window (default 5)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="interleaved runs per figure; each figure is their median (default 3)")
    parser.add_argument("--connections", type=int, default=32, metavar="C", help="wrk connections (default 32)")
    parser.add_argument("--big", action="store_true", help="R7 drains a 1M-event backlog (default 200k)")
    parser.add_argument("--window", type=float, default=60.0, metavar="SECONDS",
                        help="R9: how long each offered rate must keep the backlog bounded (default 60)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, metavar="URL",
                        help="a Postgres where bench may create and drop databases "
                             "(default $TRACKRELAY_TEST_POSTGRES_URL or postgres@127.0.0.1:5432)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    return parser


def _groups(wanted: set[str]) -> list[tuple[set[str], Callable[[Session, str], list[Figure]]]]:
    """Which functions measure which figures, in the order they run (later ones reuse facts)."""
    groups: list[tuple[set[str], Callable[[Session, str], list[Figure]]]] = []
    if wanted & {"R1", "R2"}:
        groups.append((wanted & {"R1", "R2"}, lambda s, b: ingest.single_events(s, b, wanted)))
    table = {"R3": [ingest.batches], "R4": [drain.pipeline_drain], "R5": [drain.webhook_delivery],
             "R6": [latency.end_to_end], "R7": [ingest.receiver_memory, drain.big_backlog],
             "R8": [steady.steady_delivery], "R9": [fanout.sustained_fanout], "R10": [isolation.isolation]}
    for name, functions in table.items():
        if name in wanted:
            groups += [({name}, function) for function in functions]
    return groups


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT, timeout=10).stdout.strip() or "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=ROOT, timeout=10).stdout.splitlines()
        if changed:
            commit += f" + uncommitted changes to {len(changed)} files"
    except OSError:
        commit = "unknown"
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({model}), "
            f"{memory_kb / 1024 / 1024:.1f} GiB RAM; commit {commit}; Python {platform.python_version()}; "
            f"servers on CPU {cpu_list(SERVER_CPUS)}, load on CPU {cpu_list(LOAD_CPUS)}; "
            f"load average {os.getloadavg()[0]:.2f} at start")


def run(session: Session, backends: Sequence[str], wanted: set[str]) -> list[Figure]:
    figures: list[Figure] = []
    for backend in backends:
        if backend == "postgres" and (problem := session.databases.postgres_problem()):
            figures += [Figure(backend, name, "-", error=problem) for name in FIGURES if name in wanted]
            continue
        for names, measure in _groups(wanted):
            session.say(f"{backend}: measuring {', '.join(sorted(names))}")
            try:
                figures += measure(session, backend)
            except Exception as exc:  # one figure that cannot be measured must not hide the others
                traceback.print_exc(file=sys.stderr)
                figures += [Figure(backend, name, "-", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                            for name in sorted(names)]
    return figures


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.connections < 1 or args.window < 3:
        print("bench: --runs, --duration and --connections must be positive, --window at least 3", file=sys.stderr)
        return 2
    require_wrk()
    if shutil.which("taskset") is None:
        print("bench: taskset is missing (util-linux)", file=sys.stderr)
        return 2
    wanted = set(FIGURES) if "all" in args.figures else set(args.figures)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if len(os.sched_getaffinity(0)) < 2:
        print("bench: only one CPU: servers and load generator share it", file=sys.stderr)
    os.sched_setaffinity(0, LOAD_CPUS)  # this process is part of the load
    signal.signal(signal.SIGTERM, _interrupt)  # stop the servers and drop the databases on SIGTERM too
    header = machine()
    workdir = Path(tempfile.mkdtemp(prefix="trackrelay-bench-"))
    session = Session(BenchOptions(args.duration, args.runs, args.connections, args.big, args.window), workdir,
                      Databases(workdir, args.postgres_url))
    session.say(f"{header}; work directory {workdir}")
    started = time.monotonic()
    try:
        figures = run(session, backends, wanted)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        session.databases.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    footer = (f"{args.runs} runs per figure, {args.duration:g} s per wrk run, {args.connections} connections; "
              f"took {time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{header}\n{footer}\n\n{text_table(figures)}")
    if args.markdown:
        print(f"\n{header}  \n{footer}\n\n{markdown_table(figures)}")
    return 1 if any(f.verdict() == "ERROR" for f in figures) else 0
