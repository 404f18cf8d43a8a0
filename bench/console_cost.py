"""What the operator console and its metrics cost the tracking API (issue 13): R1's load
(single-event ``POST /v1/track`` under wrk) against ``trackrelay serve`` with the console and
``/metrics`` on (scraped every ``--scrape-seconds``, Prometheus's default of 15 unless told)
and with the console off (``TRACKRELAY_ADMIN_PORT=0``), runs interleaved.

Two figures per variant: requests per second, and the receiver's CPU time per request (user +
system, from /proc). On a shared VM the rate swings by a third from run to run with whatever
else the host runs; CPU time per request moves far less, so it is the figure the 3% target is
judged on, with the rate printed beside it.

    python -m bench.console_cost [--backend sqlite|postgres] [--runs 5] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import urllib.request
from pathlib import Path

from bench.databases import DEFAULT_POSTGRES_URL, Databases
from bench.load import post_checked, require_wrk, run_wrk
from bench.messages import AUTHORIZATION, track_body
from bench.processes import free_port
from bench.servers import start_receiver

WARM_UP = 20
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def scrape_every(seconds: float, port: int, stop: threading.Event) -> int:
    scrapes = 0
    while not stop.wait(seconds):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            answer.read()
        scrapes += 1
    return scrapes


def one_run(databases: Databases, workdir: Path, backend: str, console: bool, duration: float,
            connections: int, scrape_seconds: float) -> tuple[float, float]:
    """(requests/s, receiver CPU microseconds per request) of one wrk run."""
    admin_port = free_port()
    env = {"TRACKRELAY_ADMIN_PORT": str(admin_port) if console else "0"}
    database = databases.create(backend)
    body = workdir / "track.json"
    body.write_bytes(track_body("console-cost"))
    try:
        receiver, port = start_receiver(workdir, database, env=env)
        with receiver:
            post_checked(port, "/v1/track", body.read_bytes(), AUTHORIZATION, WARM_UP)
            stop = threading.Event()
            scraper = None
            if console and scrape_seconds > 0:
                scraper = threading.Thread(target=scrape_every, args=(scrape_seconds, admin_port, stop),
                                           daemon=True)
                scraper.start()
            before = cpu_seconds(receiver.pid)
            result = run_wrk(f"http://127.0.0.1:{port}/v1/track", body, duration, connections, AUTHORIZATION)
            used = cpu_seconds(receiver.pid) - before
            stop.set()
            if scraper is not None:
                scraper.join(15)
        return result.rate, used / max(result.requests, 1) * 1e6
    finally:
        databases.drop(database)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.console_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--scrape-seconds", type=float, default=15.0, help="0: never scraped")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    options = parser.parse_args()
    require_wrk()
    figures: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="trackrelay-console-cost-") as folder:
        workdir = Path(folder)
        databases = Databases(workdir, options.postgres_url)
        try:
            for run in range(options.runs):
                for console in (run % 2 == 0, run % 2 != 0):  # alternate which goes first
                    rate, cpu = one_run(databases, workdir, options.backend, console, options.duration,
                                        options.connections, options.scrape_seconds)
                    figures[console].append((rate, cpu))
                    print(f"run {run + 1} console {'on ' if console else 'off'}: {rate:,.0f} req/s, "
                          f"{cpu:,.1f} us CPU/request", flush=True)
        finally:
            databases.close()
    on_rate, on_cpu = (statistics.median(f[i] for f in figures[True]) for i in (0, 1))
    off_rate, off_cpu = (statistics.median(f[i] for f in figures[False]) for i in (0, 1))
    print(f"\n{options.backend}: console on {on_rate:,.0f} req/s, {on_cpu:,.1f} us/request; "
          f"off {off_rate:,.0f} req/s, {off_cpu:,.1f} us/request (medians of {options.runs}; "
          f"scraped every {options.scrape_seconds:g} s)")
    print(f"rate on/off {on_rate / off_rate:.3f}; CPU per request off/on {off_cpu / on_cpu:.3f} "
          f"(target >= 0.97: {'PASS' if off_cpu / on_cpu >= 0.97 else 'FAIL'})")


if __name__ == "__main__":
    main()
