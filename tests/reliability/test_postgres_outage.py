"""Postgres taken away under load from a real ``trackrelay run`` (receiver and worker processes,
delivering to a loopback webhook sink): stopped with ``pg_ctl -m fast`` and ``-m immediate``,
and frozen with SIGSTOP, on a throwaway cluster (never the shared server).

While the database is down every answer is ``503`` with ``Retry-After`` and comes within the
documented bound; once it is back the same processes recover by themselves; every event
acknowledged is stored and delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from http_sink import HttpSink
from reliability.outage_load import (SETTLE_SECONDS, Load, Trackrelay, by_status, check_answers_while_down, health,
                                     nothing_lost, wait_answering, wait_delivered, write_config)
from reliability.pg_cluster import ThrowawayCluster, throwaway_cluster
from pipeline_harness import free_port, wait_for

LOCK_TIMEOUT = 1.0
# README, [database] lock_timeout_seconds: a write waits up to that long for a lock or a
# connection before its 503, and "a commit that has not finished 5 s after that is answered
# 503 too" (receiver/context.py: the group committer's timeout).
BOUND = LOCK_TIMEOUT + 5
SLACK = 1.5  # reading, answering and scheduling on a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    with throwaway_cluster() as started:
        yield started


def take_down(cluster: ThrowawayCluster, fault: str) -> Callable[[], None]:
    """Apply the fault; return what undoes it."""
    if fault == "frozen":
        cluster.freeze()
        return cluster.thaw
    cluster.stop(fault)
    return cluster.start


@pytest.mark.parametrize("fault", ["fast", "immediate", "frozen"])
def test_postgres_outage_under_load(fault: str, cluster: ThrowawayCluster, tmp_path: Path,
                                    figures: Callable[[str], None]) -> None:
    database_url = cluster.create_database(f"outage_{fault}")
    sink = HttpSink()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = Trackrelay("run", write_config(tmp_path, database_url, port, sink.url, LOCK_TIMEOUT), tmp_path / "run.log")
    load = Load(base)
    restore: Callable[[], None] | None = None
    try:
        wait_answering(base, run)
        assert health(base)[0] == 200
        load.start()
        load.wait_answers(100, since=0)

        restore = take_down(cluster, fault)
        down_from = time.monotonic()
        # Down long enough for every client to be answered while it is (a frozen server: past
        # the commit timeout, so that the bound is what answers them), and for 1.5 s at least.
        load.wait_answers(load.clients, since=down_from + SETTLE_SECONDS, timeout=BOUND + 10)
        wait_for(lambda: time.monotonic() - down_from >= 1.5, "the outage to last 1.5 s")
        down_health = health(base)
        down_until = time.monotonic()
        restore()
        restore = None
        up = time.monotonic()
        recovered = load.wait_acked_since(up)
        load.wait_answers(100, since=up + recovered)
        load.finish()
        run.alive()  # recovered without a restart
        delivered = wait_delivered(sink, load.acked, run)
        assert health(base)[0] == 200
    finally:
        if restore is not None:
            restore()
        load.finish(timeout=5)
        stopped = run.stop()
        sink.stop()
    assert stopped == 0, run.log[-3000:]

    down, worst = check_answers_while_down(load, down_from, down_until, BOUND + SLACK)
    assert down_health[0] == 503, down_health
    acked, stored = nothing_lost(load, database_url, delivered)
    figures(f"{fault}: answers {by_status(load.answers)}; while down {len(down):,} answers, all 503 with "
            f"Retry-After, longest in flight {worst:.2f} s (bound lock_timeout_seconds + 5 = {BOUND:g} s); "
            f"first 200 {recovered:.2f} s after {'SIGCONT' if fault == 'frozen' else 'pg_ctl start'}; "
            f"acked={len(acked):,} stored={len(stored):,} (rows {sum(stored.values()):,}) "
            f"delivered={len(delivered):,} (twice: {sum(1 for n in delivered.values() if n > 1):,})")
