"""The adaptive concurrency limit (issue 14): the controller on its own with a clock the test
moves, then the webhook destination against real loopback sinks of known behaviour: a fixed
latency, a capacity that answers 429 past N in flight, a sink that slows down and recovers.
Assertions are on the limits and counts the controller and the sink report."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from http_sink import Answer, HttpSink, Recorded
from pipeline.destinations.base import DELIVERED, Outcome
from pipeline.destinations.concurrency import AdaptiveConcurrency, Concurrency
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions
from pipeline.operations import status
from pipeline.store import Store
from pipeline_harness import Pipeline, wait_for, webhook


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window(controller: AdaptiveConcurrency, clock: Clock, rtt: float, pushed_back: int = 0) -> None:
    """One window of requests at the limit, all answered after ``rtt`` seconds."""
    count = controller.limit
    for _ in range(count):
        controller.started()
    clock.now += rtt + 1e-6  # a window is at least one round trip
    for i in range(count):
        controller.finished(rtt, pushed_back=i < pushed_back)


def test_slow_start_doubles_each_window_while_the_round_trip_holds_up_to_the_maximum() -> None:
    clock = Clock()
    controller = AdaptiveConcurrency(max_concurrency=100, clock=clock)
    limits = []
    for _ in range(6):
        window(controller, clock, 0.05)
        limits.append(controller.limit)
    assert limits == [16, 32, 64, 100, 100, 100]
    assert controller.snapshot().rtt_ms == pytest.approx(50.0)


def test_no_growth_without_reaching_the_limit() -> None:
    clock = Clock()
    controller = AdaptiveConcurrency(clock=clock)
    for _ in range(5):
        controller.started()  # 1 of 8 in flight
        clock.now += 0.05
        controller.finished(0.05, pushed_back=False)
    assert controller.limit == 8


def test_push_back_halves_after_slow_start_then_takes_a_tenth_off() -> None:
    clock = Clock()
    controller = AdaptiveConcurrency(clock=clock)
    window(controller, clock, 0.05)
    window(controller, clock, 0.05)
    assert controller.limit == 32
    window(controller, clock, 0.05, pushed_back=3)
    assert controller.limit == 16  # the first cut halves: slow start overshot
    window(controller, clock, 0.05)
    assert controller.limit == 17  # then one more per window
    window(controller, clock, 0.05, pushed_back=1)
    assert controller.limit == 15  # floor(17 * 0.9)
    snapshot = controller.snapshot()
    assert (snapshot.cuts, snapshot.back_pressure) == (2, 4)


def test_a_rising_round_trip_cuts_and_the_new_speed_becomes_the_baseline() -> None:
    clock = Clock()
    controller = AdaptiveConcurrency(max_concurrency=64, clock=clock)
    for _ in range(5):
        window(controller, clock, 0.02)
    assert controller.limit == 64
    limits = []
    for _ in range(12):
        window(controller, clock, 0.2)  # ten times slower
        limits.append(controller.limit)
    # Cut within a window or two (the window the change fell in still held fast answers), and
    # the first cut halves...
    assert 32 in limits[:2] and min(limits) == 32, limits
    assert limits[-1] > min(limits)  # ...and growing again once 200 ms is the baseline
    assert controller.snapshot().baseline_rtt_ms == pytest.approx(200, rel=0.1)


def test_the_limit_never_goes_under_one() -> None:
    clock = Clock()
    controller = AdaptiveConcurrency(clock=clock)
    for _ in range(40):
        window(controller, clock, 0.05, pushed_back=1)
    assert controller.limit == 1


def test_a_fixed_limit_stays_and_still_counts_push_back() -> None:
    controller = Concurrency(5)
    for _ in range(5):
        controller.started()
    for _ in range(5):
        controller.finished(0.01, pushed_back=True)
    snapshot = controller.snapshot()
    assert (snapshot.mode, snapshot.limit, snapshot.max_concurrency, snapshot.back_pressure) == ("fixed", 5, 5, 5)


# --- against real sinks ------------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[HttpSink]:  # the plain sink (conftest's is the scripted one)
    running = HttpSink()
    yield running
    running.stop()


def events(count: int, tag: str) -> list[dict[str, str]]:
    return [{"type": "track", "event": "E", "userId": "u", "messageId": f"{tag}-{i}"} for i in range(count)]


def deliver_all(destination: WebhookDestination, batches: list[list[dict[str, str]]]) -> list[list[Outcome]]:
    """Each batch delivered in turn by one started destination (as lanes would, all at once)."""
    async def main() -> list[list[Outcome]]:
        await destination.start()
        try:
            return [await destination.deliver(batch) for batch in batches]
        finally:
            await destination.close()
    return asyncio.run(main())


def test_with_a_fixed_latency_the_limit_grows_to_what_the_latency_needs(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(200, delay=0.05)
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url, max_concurrency=128), 1)
    [outcomes] = deliver_all(destination, [events(2000, "a")])
    assert outcomes == [DELIVERED] * 2000
    snapshot = destination.controller.snapshot()
    # 50 ms answers and no other bound: the limit goes to its ceiling, and the sink saw it used.
    assert snapshot.limit >= 64 and snapshot.cuts <= 2, snapshot
    assert sink.max_in_flight >= 64 and sink.max_in_flight <= 128
    assert len(sink.requests) == 2000


def test_against_a_capacity_of_16_the_limit_settles_near_16(sink: HttpSink) -> None:
    lock = threading.Lock()
    answered = {"ok": 0, "refused": 0}

    def capacity(_: Recorded) -> Answer:
        with lock:
            if sink.in_flight > 16:  # this request included
                answered["refused"] += 1
                return Answer(429)
            answered["ok"] += 1
        return Answer(200, delay=0.05)

    sink.answers = capacity
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url), 1)
    limits: list[int] = []
    batches = [events(200, f"b{n}") for n in range(10)]

    async def main() -> None:
        await destination.start()
        try:
            for batch in batches:
                await destination.deliver(batch)
                limits.append(destination.controller.limit)
        finally:
            await destination.close()

    asyncio.run(main())
    settled = limits[3:]
    assert all(8 <= limit <= 24 for limit in settled), limits
    assert answered["refused"] < 0.1 * (answered["ok"] + answered["refused"]), answered
    assert destination.controller.snapshot().back_pressure == answered["refused"]


@pytest.mark.parametrize(("status", "pushed_back"), [
    (503, 200), (502, 200), (504, 200), (408, 200), (429, 200),  # overload: every one
    (500, 199), (507, 199),  # every one that follows another failure
    (501, 0), (400, 0), (404, 0)])  # refusals: none
def test_a_destination_answering_a_failure_to_everything_is_cut_and_a_refusal_is_not(
        sink: HttpSink, status: int, pushed_back: int) -> None:
    """A destination answering 5xx to everything is down: left at its limit it would cost the
    worker as much as a healthy one (bench R10). A 4xx (or 501) refuses the events, not the load."""
    sink.answers = lambda _: Answer(status)
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url), 1)
    [outcomes] = deliver_all(destination, [events(200, f"s{status}")])
    assert {o.kind for o in outcomes} == ({"rejected"} if status in (501, 400, 404) else {"retry"})
    snapshot = destination.controller.snapshot()
    assert len(sink.requests) == 200 and destination.pause_seconds() == 0  # no Retry-After: no pause
    assert snapshot.back_pressure == pushed_back, snapshot
    if pushed_back:
        assert snapshot.cuts >= 1 and snapshot.limit < 8, snapshot


def test_a_lone_500_among_successes_does_not_cut_but_two_in_a_row_do(sink: HttpSink) -> None:
    """One bad event's 500 says nothing about the load: every 10th answer a 500 leaves the
    limit to grow; two failures in a row are push-back."""
    answered = itertools.count()
    sink.answers = lambda _: Answer(500 if next(answered) % 10 == 9 else 200)
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url, concurrency=1), 1)  # answers in order
    [outcomes] = deliver_all(destination, [events(100, "lone")])
    assert [o.kind for o in outcomes].count("retry") == 10
    assert destination.controller.snapshot().back_pressure == 0
    answered = itertools.count()
    sink.answers = lambda _: Answer(500 if next(answered) % 10 in (8, 9) else 200)
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url, concurrency=1), 1)
    deliver_all(destination, [events(100, "pairs")])
    assert destination.controller.snapshot().back_pressure == 10  # the second of each pair


def test_a_sink_that_slows_down_cuts_the_limit_and_one_that_recovers_lets_it_grow(sink: HttpSink) -> None:
    latency = {"seconds": 0.02}
    sink.answers = lambda _: Answer(200, delay=latency["seconds"])
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url, max_concurrency=64), 1)
    limits: dict[str, list[int]] = {"fast": [], "slow": [], "again": []}
    phase = ["fast"]

    async def sample() -> None:
        while True:
            limits[phase[0]].append(destination.controller.limit)
            await asyncio.sleep(0.005)

    async def main() -> None:
        await destination.start()
        sampler = asyncio.create_task(sample())
        try:
            await destination.deliver(events(1500, "fast"))
            phase[0], latency["seconds"] = "slow", 0.2
            await destination.deliver(events(600, "slow"))
            phase[0], latency["seconds"] = "again", 0.02
            await destination.deliver(events(1500, "again"))
        finally:
            sampler.cancel()
            await destination.close()

    asyncio.run(main())
    fast, slow, again = limits["fast"][-1], min(limits["slow"]), max(limits["again"])
    assert slow < fast, limits["slow"]  # ten times slower: the limit was cut
    assert again > slow, limits["again"]  # and it grew again once the sink was fast again


def test_the_workers_limit_and_round_trip_reach_status_and_go_when_it_stops(
        start_pipeline: Callable[..., Pipeline], sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(200, delay=0.05)
    pipeline = start_pipeline([webhook(sink.url, name="slow"), webhook(sink.url, name="fixed", concurrency=3)])
    # Batches: the worker holds a backlog beyond the starting limit (8), so the limit is used
    # and grows (single posts one after another trickle in under it and give no evidence).
    for b in range(3):
        batch = [{"type": "track", "userId": "u", "event": "E", "messageId": f"s-{b}-{i}"} for i in range(100)]
        assert pipeline.receiver.post("/v1/batch", {"batch": batch}).status_code == 200
    wait_for(lambda: pipeline.db.settled(600), "every event delivered to both")
    store = Store.open(pipeline.config.database)
    try:
        def reported() -> dict[str, Any] | None:
            found = {name: d.concurrency for name, d in status(store, pipeline.config).destinations.items()}
            return found if all(c is not None and c.rtt_ms is not None for c in found.values()) else None
        found = wait_for(reported, "the worker to publish its controllers")
        slow, fixed = found["slow"], found["fixed"]
        assert (slow.mode, slow.max_concurrency, slow.workers) == ("adaptive", 256, 1)
        assert slow.limit > 8 and slow.rtt_ms >= 50  # grew from 8 under 50 ms answers
        assert (fixed.mode, fixed.limit, fixed.max_concurrency) == ("fixed", 3, 3) and fixed.rtt_ms >= 50
        pipeline.worker.stop()
        assert all(d.concurrency is None for d in status(store, pipeline.config).destinations.values())
    finally:
        store.dispose()
