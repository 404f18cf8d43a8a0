"""The receiver SIGKILLed under load: every 200 was committed, and every committed event is
delivered (acked ⊆ stored ⊆ delivered).

Eight clients send single events and batches of three, each with fresh messageIds, as fast as
they can, to a real ``trackrelay run`` (three kills: the receiver process twice, then the whole
process group at once) and a real ``trackrelay serve --processes 2`` beside a ``trackrelay
worker`` (one of the two receiver processes killed). A request that got no answer may or may
not be stored; one that got a 200 must be. Afterwards the worker drains to a counting sink.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline_harness import Database, Process, Processes, ScriptedSink, wait_for, webhook, write_config
from reliability.processes import (Load, Server, all_delivered, sigkill, started_pids, started_processes,
                                   stored_message_ids, wait_started)

# Messages acknowledged between two kills (and after the last restart).
ROUND = 800
DRAIN_SECONDS = 90.0


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    yield from started_processes(tmp_path)


def config_for(tmp_path: Path, database_url: str, sink: ScriptedSink) -> Path:
    return write_config(tmp_path / "trackrelay.toml", database_url, [webhook(sink.url, batch_size=50)])


def kill_a_child(process: Process, victim: int) -> None:
    """SIGKILL one forked child: the supervisor stops the others and exits 1, as
    receiver/processes.py says, so that systemd (Restart=on-failure) restarts the unit."""
    sigkill(victim)
    assert process.wait() == 1, process.log
    assert f"event=child_exited pid={victim} code=-9 action=stopping_all" in process.log


def no_tracebacks(processes: Processes) -> None:
    for process in processes.started:
        assert "Traceback" not in process.log, process.log


def drained_and_checked(load: Load, db: Database, sink: ScriptedSink) -> str:
    """Assert acked ⊆ stored ⊆ delivered once the worker drained; the figures line."""
    # A receiver being stopped answers what it holds, and a 503 (with Retry-After) to a
    # request that comes on a kept-alive connection once its writer has closed.
    assert set(load.statuses) <= {200, 503}, f"answers other than 200 and 503: {load.statuses}"
    assert load.without_retry_after == 0
    stored_ids = stored_message_ids(db)
    stored = set(stored_ids)
    assert len(stored_ids) == len(stored), "a message was stored twice"
    lost = load.acked - stored
    assert not lost, f"{len(lost)} acknowledged messages are not stored, e.g. {sorted(lost)[:3]}"
    assert stored <= load.sent, "stored messages that were never sent"
    wait_for(lambda: all_delivered(db, len(stored)), "the worker to deliver every stored event", DRAIN_SECONDS)
    delivered = set(sink.requests_for())
    assert delivered == stored, (f"{len(stored - delivered)} stored never reached the sink, "
                                 f"{len(delivered - stored)} delivered were never stored")
    unanswered = load.unanswered
    return (f"acked={len(load.acked):,} stored={len(stored):,} delivered={len(delivered):,} "
            f"sent_unanswered={len(unanswered):,} (stored anyway: {len(unanswered & stored):,}) "
            f"answered_503={load.statuses[503]:,} refused_connections={load.refused:,}")


def test_run_killed_three_times_under_load_keeps_every_200(
        database_url: str, tmp_path: Path, sink: ScriptedSink, processes: Processes,
        figures: Callable[[str], None]) -> None:
    server = Server(processes, "run", config_for(tmp_path, database_url, sink))
    db = Database(database_url)
    try:
        server.start()
        with Load(server.url) as load:
            for kill in range(3):
                load.wait_acked(ROUND)
                process = server.current
                assert process is not None
                if kill < 2:
                    [receiver] = started_pids(process, "receiver")
                    kill_a_child(process, receiver)
                else:
                    process.kill_group()  # receiver, worker and supervisor at the same instant
                server.start()
            load.wait_acked(ROUND)
        figures(f"run, {db.engine.dialect.name}, 3 kills: " + drained_and_checked(load, db, sink))
        assert server.current is not None
        server.current.signal(signal.SIGTERM)
        assert server.current.wait() == 0, server.current.log
        no_tracebacks(processes)
    finally:
        db.dispose()


def test_serve_with_two_processes_one_killed_under_load_keeps_every_200(
        database_url: str, tmp_path: Path, sink: ScriptedSink, processes: Processes,
        figures: Callable[[str], None]) -> None:
    path = config_for(tmp_path, database_url, sink)
    worker = processes.start("worker", "--config", str(path))
    wait_started(worker, "worker")
    server = Server(processes, "serve", path, "--processes", "2")
    db = Database(database_url)
    try:
        process = server.start(receivers=2)
        with Load(server.url) as load:
            load.wait_acked(ROUND)
            victim, survivor = started_pids(process, "receiver")
            acked_at_kill, killed_at = len(load.acked), time.monotonic()
            kill_a_child(process, victim)
            # The survivor is stopped, not killed: it finished and answered what it was
            # committing before it went.
            answered_after_kill = len(load.acked) - acked_at_kill
            assert f"pid={survivor} event=stopping role=receiver" in process.log
            assert f"pid={survivor} event=stopped role=receiver" in process.log
            server.start(receivers=2)
            down_seconds = time.monotonic() - killed_at  # the kill to a new unit's /health
            load.wait_acked(ROUND)
        line = drained_and_checked(load, db, sink)
        figures(f"serve --processes 2, {db.engine.dialect.name}, 1 of 2 killed: {line} "
                f"answered_after_kill={answered_after_kill:,} back_in={down_seconds:.1f}s")
        for running in (server.current, worker):
            assert running is not None
            running.signal(signal.SIGTERM)
            assert running.wait() == 0, running.log
        no_tracebacks(processes)
    finally:
        db.dispose()
