"""pipeline.delivery: the lease is renewed while a slow adapter call is in flight, and a poison
event is isolated by splitting the batch, without splitting an outage."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from sqlalchemy.exc import OperationalError

from pipeline.config import DestinationConfig
from pipeline.delivery import DestinationRunner, deliver_in_batches, deliver_isolating
from pipeline.destinations.base import DELIVERED, Destination, Event, NoOptions, Outcome, rejected, retry
from pipeline.queue import DeliveryQueue
from pipeline.store import Store, now_ms
from pipeline_harness import wait_for
from stored_rows import add_delivery, add_event, opened_store, rows

POISON = "poison"


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


def events(count: int, poison_at: int | None = None) -> list[Event]:
    return [{"type": "track", "event": "E", "messageId": POISON if i == poison_at else f"m{i}"}
            for i in range(count)]


def has_poison(chunk: Sequence[Event]) -> bool:
    return any(e["messageId"] == POISON for e in chunk)


# --- lease renewal -------------------------------------------------------------------------------

class SlowFakeDestination(Destination):
    """Holds each deliver() call until the test releases it (at most 30 s): a slow destination."""

    def __init__(self) -> None:
        super().__init__("hook", NoOptions(), 10)
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        self.calls.append([e["messageId"] for e in events])
        self.started.set()
        await asyncio.to_thread(self.release.wait, 30)
        return [DELIVERED] * len(events)


@contextmanager
def draining_on_a_thread(runner: DestinationRunner, adapter: SlowFakeDestination) -> Iterator[list[int]]:
    """``runner.drain`` on a thread, inside until the adapter holds its first call; on leaving,
    the adapter is released and the drain awaited. Yields the list its count lands in."""
    tried: list[int] = []
    thread = threading.Thread(target=lambda: tried.append(asyncio.run(runner.drain(lambda: False))))
    thread.start()
    try:
        assert adapter.started.wait(30)
        yield tried
    finally:
        adapter.release.set()
        thread.join(30)


def test_the_lease_is_renewed_while_a_slow_delivery_is_in_flight(store: Store) -> None:
    delivery_id = add_delivery(store, add_event(store, "m1"))
    adapter = SlowFakeDestination()
    config = DestinationConfig(name="hook", type="fake", options=NoOptions(), batch_size=10, claim_size=10)
    runner = DestinationRunner(config, adapter, DeliveryQueue(store, "runner"), lease_seconds=0.3)
    with draining_on_a_thread(runner, adapter) as tried:
        first_lease = rows(store, "deliveries")[0]["locked_until_ms"]
        # Wait until the first lease would have run out twice over: only renewal keeps it.
        wait_for(lambda: now_ms() > first_lease + 300, "the first lease to run out")
        renewed = rows(store, "deliveries")[0]

        assert DeliveryQueue(store, "other").claim("hook", 10, 60_000) == []
        assert renewed["locked_by"].startswith("runner:")
        assert renewed["locked_until_ms"] > first_lease

    assert tried == [1]
    assert adapter.calls == [["m1"]]
    (row,) = rows(store, "deliveries")
    assert (row["id"], row["state"], row["attempts"], row["locked_by"], row["locked_until_ms"]) == \
        (delivery_id, "delivered", 1, None, None)


class QueueFailingSomeRenewals(DeliveryQueue):
    """The real queue, except that the renewals numbered in ``failing`` raise, as a database
    locked past its busy timeout would: a fake failure on a real store."""

    def __init__(self, store: Store, failing: set[int]) -> None:
        super().__init__(store, "runner")
        self.failing = failing
        self.renewals = 0

    def renew(self, lease: str, ids: Sequence[int], lease_ms: int) -> int:
        self.renewals += 1
        if self.renewals in self.failing:
            raise OperationalError("UPDATE deliveries", {}, Exception("database is locked"))
        return super().renew(lease, ids, lease_ms)


def test_the_lease_is_still_renewed_after_a_renewal_failed(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    delivery_id = add_delivery(store, add_event(store, "m1"))
    adapter = SlowFakeDestination()
    config = DestinationConfig(name="hook", type="fake", options=NoOptions(), batch_size=10, claim_size=10)
    # Renewals come every third of the lease: the first and the third fail, each leaving the
    # next one in time.
    queue = QueueFailingSomeRenewals(store, failing={1, 3})
    runner = DestinationRunner(config, adapter, queue, lease_seconds=1.5)
    with caplog.at_level(logging.WARNING, logger="trackrelay.delivery"), \
            draining_on_a_thread(runner, adapter) as tried:
        first_lease = rows(store, "deliveries")[0]["locked_until_ms"]
        wait_for(lambda: now_ms() > first_lease + 1500, "the first lease to run out twice over")

        assert DeliveryQueue(store, "other").claim("hook", 10, 60_000) == []
        assert rows(store, "deliveries")[0]["locked_until_ms"] > now_ms()

    assert tried == [1]
    assert adapter.calls == [["m1"]]
    (row,) = rows(store, "deliveries")
    assert (row["id"], row["state"], row["attempts"]) == (delivery_id, "delivered", 1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "trackrelay.delivery"]
    assert len(warnings) == 1, warnings  # once per batch, not at every failed renewal
    assert warnings[0].startswith("event=lease_renew_failed destination=hook lease=runner:")
    assert "deliveries=1 error='database is locked'" in warnings[0]


def test_a_lease_lost_while_delivering_is_logged_and_its_outcome_left_to_the_new_holder(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    delivery_id = add_delivery(store, add_event(store, "m1"))
    adapter = SlowFakeDestination()
    config = DestinationConfig(name="hook", type="fake", options=NoOptions(), batch_size=10, claim_size=10)
    # Every renewal fails until well after the 1.5 s lease ran out: meanwhile another worker
    # claims the delivery, and the next renewal that gets through finds it held by that one.
    queue = QueueFailingSomeRenewals(store, failing={1, 2, 3, 4, 5})
    runner = DestinationRunner(config, adapter, queue, lease_seconds=1.5)
    other = DeliveryQueue(store, "other")
    with caplog.at_level(logging.WARNING, logger="trackrelay.delivery"), \
            draining_on_a_thread(runner, adapter) as tried:
        (taken,) = wait_for(lambda: other.claim("hook", 10, 60_000), "the lease to run out and the other claim")

        def lost() -> list[str]:
            return [r.getMessage() for r in caplog.records if "event=lease_lost" in r.getMessage()]

        (warning,) = wait_for(lost, "the renewal to find the lease lost")

    assert warning.startswith("event=lease_lost destination=hook lease=runner:")
    assert "deliveries=1 held=0" in warning
    assert tried == [1]
    # The first holder's "delivered" is not recorded: the row is the other worker's now.
    (row,) = rows(store, "deliveries")
    assert (row["id"], row["state"], row["attempts"], row["locked_by"]) == (delivery_id, "pending", 2, taken.lease)


# --- poison isolation ----------------------------------------------------------------------------

class RecordingFake(Destination):
    """Answers each call with ``answer(chunk)``; records the messageIds of every call."""

    def __init__(self, answer: Any) -> None:
        super().__init__("fake", NoOptions(), 100)
        self.answer = answer
        self.calls: list[list[str]] = []

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        self.calls.append([e["messageId"] for e in events])
        return self.answer(events)


def rejects_batches_with_poison(chunk: Sequence[Event]) -> list[Outcome]:
    if has_poison(chunk):
        return [rejected("HTTP 400: invalid batch")] * len(chunk)
    return [DELIVERED] * len(chunk)


def raises_for_batches_with_poison(chunk: Sequence[Event]) -> list[Outcome]:
    if has_poison(chunk):
        raise KeyError("properties")
    return [DELIVERED] * len(chunk)


def expected(count: int, poison_at: int, poison_outcome: Outcome) -> list[Outcome]:
    return [poison_outcome if i == poison_at else DELIVERED for i in range(count)]


@pytest.mark.parametrize("count,poison_at", [(16, 5), (16, 0), (16, 15), (2, 1)])
def test_a_batch_rejected_whole_is_split_until_only_the_poison_is_rejected(count: int, poison_at: int) -> None:
    adapter = RecordingFake(rejects_batches_with_poison)

    outcomes = asyncio.run(deliver_isolating(adapter, events(count, poison_at)))

    assert outcomes == expected(count, poison_at, rejected("HTTP 400: invalid batch"))
    # One call per halving on the poison's side, plus its clean sibling at each level.
    assert len(adapter.calls) == 2 * int(math.log2(count)) + 1
    assert adapter.calls[0] == [e["messageId"] for e in events(count, poison_at)]
    assert sum(1 for call in adapter.calls if call == [POISON]) == 1


def test_an_adapter_raising_for_a_batch_leaves_only_the_poison_to_retry(caplog: pytest.LogCaptureFixture) -> None:
    adapter = RecordingFake(raises_for_batches_with_poison)

    with caplog.at_level(logging.ERROR, logger="trackrelay.delivery"):
        outcomes = asyncio.run(deliver_isolating(adapter, events(8, 3)))

    assert outcomes == expected(8, 3, retry("KeyError: 'properties'"))
    assert len(adapter.calls) == 2 * 3 + 1
    errors = [r.getMessage() for r in caplog.records if r.name == "trackrelay.delivery"]
    assert errors == ["event=adapter_error destination=fake error=\"KeyError: 'properties'\""]


def test_a_batch_answered_retry_whole_is_an_outage_and_is_not_split() -> None:
    adapter = RecordingFake(lambda chunk: [retry("HTTP 503: down", after=2.0)] * len(chunk))

    outcomes = asyncio.run(deliver_isolating(adapter, events(8)))

    assert outcomes == [retry("HTTP 503: down", after=2.0)] * 8
    assert adapter.calls == [[f"m{i}" for i in range(8)]]


def test_rejections_for_different_reasons_are_kept_as_answered_without_splitting() -> None:
    answers = [rejected("bad email"), rejected("bad name"), DELIVERED]
    adapter = RecordingFake(lambda chunk: answers)

    assert asyncio.run(deliver_isolating(adapter, events(3))) == answers
    assert len(adapter.calls) == 1


def test_the_wrong_number_of_outcomes_retries_the_whole_batch(caplog: pytest.LogCaptureFixture) -> None:
    adapter = RecordingFake(lambda chunk: [DELIVERED] * (len(chunk) - 1))

    with caplog.at_level(logging.ERROR, logger="trackrelay.delivery"):
        outcomes = asyncio.run(deliver_isolating(adapter, events(4)))

    assert outcomes == [retry("adapter returned 3 outcomes for 4 events")] * 4
    assert len(adapter.calls) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "trackrelay.delivery"] == [
        "event=adapter_error destination=fake error='adapter returned 3 outcomes for 4 events'"]


def test_deliver_in_batches_isolates_the_poison_within_its_own_chunk_and_keeps_the_order() -> None:
    adapter = RecordingFake(rejects_batches_with_poison)
    sent = events(20, poison_at=11)

    outcomes = asyncio.run(deliver_in_batches(adapter, sent, batch_size=8))

    assert outcomes == expected(20, 11, rejected("HTTP 400: invalid batch"))
    assert sorted(map(len, adapter.calls[:3])) == [4, 8, 8]  # the three chunks first, concurrently
    assert len(adapter.calls) == 3 + 2 * 3  # clean chunks once each; the poisoned one halved 3 times
