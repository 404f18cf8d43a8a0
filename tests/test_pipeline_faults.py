"""Faults: destinations that fail, hang or refuse, and workers that die, share or collide.

A sink that answers 503 and recovers gets everything; a 400 makes a dead delivery that
``trackrelay replay`` sends again once the sink recovers; a sink that hangs past the timeout
gets the event again; a worker killed with SIGKILL mid-delivery loses nothing once restarted;
two workers on Postgres never deliver an event twice; a second worker on SQLite is refused.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningReceiver, unique_id
from http_sink import Answer
from pipeline_harness import (Database, Pipeline, Process, Processes, ScriptedSink, read_config, wait_for,
                              webhook, write_config)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_leftovers()


def tracks(count: int) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "Order Completed", "userId": f"u{i}", "messageId": unique_id()}
            for i in range(count)]


def send(receiver: RunningReceiver, messages: list[dict[str, Any]]) -> None:
    response = receiver.post("/v1/batch", {"batch": messages})
    assert (response.status_code, response.json()) == (200, {"Success": True})


def status_json(processes: Processes, config_path: Path) -> dict[str, Any]:
    """``status --json``, each destination's concurrency controller checked and left out (the
    worker publishes it every 2 s: there, or not yet)."""
    run = processes.run("status", "--json", "--config", str(config_path))
    assert run.popen.returncode == 0, run.log
    found = json.loads(run.output)
    for destination in found["destinations"].values():
        controller = destination.pop("concurrency")
        assert controller is None or (controller["mode"] == "adaptive" and controller["limit"] >= 1), controller
    return found


def hook_status(dead: int = 0, delivered: int = 0) -> dict[str, Any]:
    return {"pending": 0, "in_flight": 0, "retrying": 0, "dead": dead, "delivered_last_hour": delivered,
            "oldest_pending_age_seconds": None}


# --- destinations that fail ----------------------------------------------------------------------

def test_a_sink_answering_503_then_200_gets_every_event_once_after_retries(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    sink.decide = lambda n, _: Answer(503, b"busy") if n < 7 else Answer()
    pipeline = start_pipeline([webhook(sink.url)])
    messages = tracks(4)

    send(pipeline.receiver, messages)
    wait_for(lambda: pipeline.db.settled(4), "four deliveries to settle")

    rows = pipeline.db.deliveries()
    assert {r["state"] for r in rows} == {"delivered"}
    assert {r["last_error"] for r in rows} == {None}
    assert sum(r["attempts"] for r in rows) == len(sink.answered) == 7 + 4
    assert max(r["attempts"] for r in rows) > 1
    assert sink.counts() == {m["messageId"]: 1 for m in messages}
    assert sum(sink.counts(status=503).values()) == 7


def test_a_400_makes_the_delivery_dead_and_replay_delivers_it_once_the_sink_recovers(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink, processes: Processes) -> None:
    sink.decide = lambda n, _: Answer(400, b"no such event")
    pipeline = start_pipeline([webhook(sink.url)])
    messages = tracks(3)

    send(pipeline.receiver, messages)
    wait_for(lambda: pipeline.db.settled(3), "three deliveries to settle")

    assert [(r["state"], r["attempts"], r["last_error"], r["finished_at_ms"] is not None)
            for r in pipeline.db.deliveries()] == [("dead", 1, "rejected: HTTP 400: no such event", True)] * 3
    assert len(sink.answered) == 3  # a 400 is final: never retried
    assert status_json(processes, pipeline.config_path) == {
        "destinations": {"hook": hook_status(dead=3)}, "outbox_pending": 0, "outbox_failed": 0,
        "rejected_total": 0, "rejected_last_hour": 0, "orphaned": []}

    sink.decide = lambda n, _: Answer()
    replay = processes.run("replay", "--destination", "hook", "--config", str(pipeline.config_path))
    assert (replay.popen.returncode, replay.output) == (0, "replayed 3 dead deliveries to hook\n"), replay.log
    wait_for(lambda: pipeline.db.states() == {"delivered": 3}, "the replayed deliveries")

    assert sink.counts() == {m["messageId"]: 1 for m in messages}
    assert [(r["attempts"], r["last_error"]) for r in pipeline.db.deliveries()] == [(1, None)] * 3
    assert status_json(processes, pipeline.config_path)["destinations"] == {"hook": hook_status(delivered=3)}


def test_a_sink_hanging_past_the_timeout_is_retried_until_it_answers_in_time(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    # The first three requests are held for 5 s, far past the adapter's 0.3 s timeout (and
    # released when the sink stops); every later request is answered at once.
    sink.decide = lambda n, _: Answer(delay=5) if n < 3 else Answer()
    pipeline = start_pipeline([webhook(sink.url, timeout_seconds=0.3)])
    messages = tracks(3)
    ids = {m["messageId"] for m in messages}

    send(pipeline.receiver, messages)
    wait_for(lambda: pipeline.db.states() == {"delivered": 3}, "three deliveries")

    # A timed-out request may still have reached the destination, which can act on it after
    # the worker gave up: timeouts make delivery at-least-once. So each event may have arrived
    # twice (the held request, then the retry), never more: each was sent exactly once more
    # after its timeout, and answered in time exactly once.
    assert set(sink.counts(delayed=True)) == ids  # every first attempt hung
    assert sink.counts(delayed=False) == {i: 1 for i in ids}
    assert sink.requests_for() == {i: 2 for i in ids}
    assert [r["attempts"] for r in pipeline.db.deliveries()] == [2] * 3


# --- workers that die ---------------------------------------------------------------------------

def start_worker(processes: Processes, config_path: Path) -> Process:
    worker = processes.start("worker", "--config", str(config_path))
    worker.wait_for_log(r"event=started role=worker")
    return worker


def test_a_worker_killed_mid_delivery_and_restarted_delivers_every_event(
        database_url: str, tmp_path: Path, sink: ScriptedSink, processes: Processes) -> None:
    sink.decide = lambda n, _: Answer(delay=0.5)  # slow: the kill lands while requests are in flight
    path = write_config(tmp_path / "trackrelay.toml", database_url, [webhook(sink.url, concurrency=4)])
    receiver = RunningReceiver(read_config(path))
    db = Database(database_url)
    try:
        messages = tracks(12)
        ids = {m["messageId"] for m in messages}
        send(receiver, messages)

        first = start_worker(processes, path)
        wait_for(lambda: sink.answered, "the first request at the sink")
        first.signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        sent_before = set(sink.requests_for())
        # The dead worker finished none of the deliveries it had claimed (all of them, or, when
        # a lane claimed while another lane's claim was under way, the share the in-hand target
        # left it: pipeline/delivery.py).
        leased = [r for r in db.deliveries() if r["locked_by"] is not None]
        assert leased and [(r["state"], r["attempts"]) for r in leased] == [("pending", 1)] * len(leased)

        # SQLite: the new worker takes every lease back at once (only one worker can run).
        # Postgres: the leases come back when they run out (lease_seconds = 2).
        second = start_worker(processes, path)
        wait_for(lambda: db.states() == {"delivered": 12}, "every delivery after the restart")

        assert set(sink.requests_for()) == ids
        assert all(sink.requests_for()[i] >= 2 for i in sent_before)  # in flight when killed: sent again
        assert all(r["locked_by"] is None for r in db.deliveries())
        if db.engine.dialect.name == "sqlite":
            assert f"event=leases_taken_back count={len(leased)}" in second.log
        second.signal(signal.SIGTERM)
        assert second.wait() == 0, second.log
    finally:
        receiver.stop()
        db.dispose()


def test_a_worker_stopped_with_sigterm_mid_delivery_finishes_its_batch_first(
        database_url: str, tmp_path: Path, sink: ScriptedSink, processes: Processes) -> None:
    sink.decide = lambda n, _: Answer(delay=0.5)
    path = write_config(tmp_path / "trackrelay.toml", database_url, [webhook(sink.url)])
    receiver = RunningReceiver(read_config(path))
    db = Database(database_url)
    try:
        messages = tracks(4)
        send(receiver, messages)
        worker = start_worker(processes, path)
        wait_for(lambda: len(sink.answered) == 4, "four requests in flight")
        worker.signal(signal.SIGTERM)

        assert worker.wait() == 0, worker.log
        # The batch in flight was answered and recorded before the worker went: nothing is
        # left leased, so nothing will be sent a second time.
        assert db.states() == {"delivered": 4}
        assert sink.requests_for() == {m["messageId"]: 1 for m in messages}
        assert "Traceback" not in worker.log
    finally:
        receiver.stop()
        db.dispose()


@pytest.mark.postgres
def test_two_workers_on_postgres_share_the_work_and_deliver_no_event_twice(
        postgres_url: str, tmp_path: Path, sink: ScriptedSink, processes: Processes) -> None:
    sink.decide = lambda n, _: Answer(delay=0.01)
    # Each worker marks its requests with a header of its own, to show that both took part.
    # Four requests in flight each, so that one worker cannot hold all 300 at once (with an
    # adaptive limit, the first worker took them all before the second's next poll).
    configs = [write_config(tmp_path / f"worker-{name}.toml", postgres_url,
                            [webhook(sink.url, headers={"X-Worker": name}, claim_size=10, concurrency=4)])
               for name in ("a", "b")]
    receiver = RunningReceiver(read_config(configs[0]))
    db = Database(postgres_url)
    try:
        workers = [start_worker(processes, path) for path in configs]
        messages = tracks(300)
        for start in range(0, 300, 100):
            send(receiver, messages[start:start + 100])
        wait_for(lambda: db.settled(300), "300 deliveries to settle", timeout=60)

        assert sink.counts() == {m["messageId"]: 1 for m in messages}
        assert len(sink.answered) == 300
        assert db.states() == {"delivered": 300}
        by_worker = Counter(recorded.headers["X-Worker"] for recorded, _, _ in sink.answered)
        assert set(by_worker) == {"a", "b"}, by_worker
        for worker in workers:
            worker.signal(signal.SIGTERM)
        assert [worker.wait() for worker in workers] == [0, 0]
    finally:
        receiver.stop()
        db.dispose()


def test_a_second_worker_on_sqlite_exits_1_saying_another_worker_runs(
        sqlite_url: str, tmp_path: Path, processes: Processes) -> None:
    path = write_config(tmp_path / "trackrelay.toml", sqlite_url, [])
    first = start_worker(processes, path)

    second = processes.run("worker", "--config", str(path))

    assert second.popen.returncode == 1
    assert "another trackrelay worker is already running on this SQLite database" in second.log
    assert first.popen.poll() is None
    first.signal(signal.SIGTERM)
    assert first.wait() == 0, first.log
    # The lock goes with the worker that held it: the next one starts.
    third = start_worker(processes, path)
    third.signal(signal.SIGTERM)
    assert third.wait() == 0, third.log
