"""Isolation (issue 14): a destination that is down does not hold the others back.

Three webhooks share one worker; the third is down (its connections refused, its answers held
past the timeout, or every answer a 500). The two healthy ones get every event exactly once,
first time, and all of it before the down one has used up its attempts; the down one's
deliveries end dead, and once it is back a replay delivers each of them exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import RunningReceiver, unique_id
from http_sink import Answer, HttpSink
from pipeline.operations import replay_deliveries
from pipeline_harness import Pipeline, ScriptedSink, free_port, wait_for, webhook

EVENTS = 200
SINGLES = 100  # sent one /v1/track each; the rest in /v1/batch requests of BATCH
BATCH = 25
MAX_ATTEMPTS = 3
# The down destination's backoff is slower than the healthy ones' (which never need it): its
# attempts then span longer than the healthy deliveries take, so "the healthy ones finished
# first" says they did not wait for it, and not merely that it failed fast.
DOWN_RETRIES = {"max_attempts": MAX_ATTEMPTS, "retry_initial_seconds": 2.0, "retry_max_seconds": 4.0}
TIMEOUT_SECONDS = 0.3
HEALTHY = ("first", "second")


def messages(count: int) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "Order Completed", "userId": f"u{i % 7}", "messageId": unique_id()}
            for i in range(count)]


def send(receiver: RunningReceiver, sent: list[dict[str, Any]]) -> None:
    for message in sent[:SINGLES]:
        response = receiver.post("/v1/track", message)
        assert (response.status_code, response.json()) == (200, {"Success": True})
    rest = sent[SINGLES:]
    for start in range(0, len(rest), BATCH):
        response = receiver.post("/v1/batch", {"batch": rest[start:start + BATCH]})
        assert (response.status_code, response.json()) == (200, {"Success": True})


class Down:
    """The third destination: its URL, down in one way until :meth:`bring_back`; then the
    sink that answers there (``ScriptedSink``)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.started: list[HttpSink] = []
        self.sink: ScriptedSink | None = None
        if how == "refused":
            # Nothing listens on this port until bring_back starts a sink on it.
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.settings: dict[str, Any] = {}
        else:
            running = HttpSink()
            self.started.append(running)
            # Held far past the adapter's timeout (released when the sink stops), or a 500.
            hold = Answer(delay=30) if how == "timeout" else Answer(500, b"down")
            self.sink = ScriptedSink(running, lambda n, _: hold)
            self.url = running.url
            # A fixed concurrency: timeouts cut an adaptive limit down to one request in flight,
            # and 200 events of three 0.3 s attempts each would take three minutes to go dead.
            self.settings = {"timeout_seconds": TIMEOUT_SECONDS, "concurrency": 64} if how == "timeout" else {}

    def bring_back(self) -> ScriptedSink:
        if self.how == "refused":
            running = HttpSink(port=self.port)
            self.started.append(running)
            self.sink = ScriptedSink(running)
        assert self.sink is not None
        self.sink.decide = lambda n, _: Answer()
        return self.sink

    def stop(self) -> None:
        for running in self.started:
            running.stop()


@pytest.fixture(params=["refused", "timeout", "status_500"])
def down(request: pytest.FixtureRequest) -> Iterator[Down]:
    third = Down(request.param)
    yield third
    third.stop()


@pytest.fixture
def healthy_sinks() -> Iterator[list[ScriptedSink]]:
    running = [HttpSink() for _ in HEALTHY]
    yield [ScriptedSink(sink) for sink in running]
    for sink in running:
        sink.stop()


def test_one_destination_down_does_not_hold_back_two_that_deliver_and_its_events_replay_once_it_is_back(
        start_pipeline: Callable[..., Pipeline], healthy_sinks: list[ScriptedSink], down: Down) -> None:
    pipeline = start_pipeline([webhook(sink.url, name=name) for name, sink in zip(HEALTHY, healthy_sinks)]
                              + [webhook(down.url, name="down", **DOWN_RETRIES, **down.settings)])
    sent = messages(EVENTS)
    ids = [m["messageId"] for m in sent]
    send(pipeline.receiver, sent)

    wait_for(lambda: pipeline.db.settled(3 * EVENTS), "every delivery to settle", timeout=120)

    # The healthy ones: every event exactly once, each at its first attempt.
    for name, sink in zip(HEALTHY, healthy_sinks):
        assert sink.requests_for() == {i: 1 for i in ids}, name
        rows = pipeline.db.deliveries(name)
        assert {(r["state"], r["attempts"], r["last_error"]) for r in rows} == {("delivered", 1, None)}, name
    # The down one: every delivery dead after its attempts.
    dead = pipeline.db.deliveries("down")
    assert sorted(r["message_id"] for r in dead) == sorted(ids)
    assert {(r["state"], r["attempts"]) for r in dead} == {("dead", MAX_ATTEMPTS)}
    assert all(r["last_error"].startswith(f"gave up after {MAX_ATTEMPTS} attempts") for r in dead)
    if down.how != "refused":
        assert down.sink is not None
        seen = down.sink.requests_for()
        if down.how == "timeout":
            # A request the worker gave up on (0.3 s) before the sink's thread, which shares
            # this process's GIL with the worker, read it is not seen there: at most one per
            # attempt (a CI run on a busy machine saw 2 of 3 for 20 of the 200 events).
            assert set(seen) == set(ids) and all(1 <= n <= MAX_ATTEMPTS for n in seen.values()), seen
            assert sum(seen.values()) >= 0.8 * MAX_ATTEMPTS * EVENTS, sum(seen.values())
        else:
            assert seen == {i: MAX_ATTEMPTS for i in ids}
        assert not down.sink.counts(delayed=False)  # nothing was answered in time

    # Not held back, by the worker's own record: when the healthy deliveries were all
    # finished, most of the down one's were still being retried (not yet dead).
    healthy_done = max(r["finished_at_ms"] for name in HEALTHY for r in pipeline.db.deliveries(name))
    dead_by_then = sum(r["finished_at_ms"] <= healthy_done for r in dead)
    assert dead_by_then < EVENTS // 2, (dead_by_then, EVENTS)

    back = down.bring_back()
    answered_before = len(back.answered)
    assert replay_deliveries(pipeline.receiver.store, "down") == EVENTS
    wait_for(lambda: pipeline.db.states("down") == {"delivered": EVENTS}, "the replayed deliveries", timeout=60)

    replayed = back.answered[answered_before:]
    assert sorted(i for _, carried, _ in replayed for i in carried) == sorted(ids)  # each exactly once
    assert {(r["attempts"], r["last_error"]) for r in pipeline.db.deliveries("down")} == {(1, None)}
    # The replay went to the down destination only.
    for sink in healthy_sinks:
        assert sink.requests_for() == {i: 1 for i in ids}
