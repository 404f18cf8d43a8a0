"""DestinationRunner.drain runs several claim lanes: when one fails, drain ends with all of them.

The others claim no more but finish and record the batch they hold, and drain raises only once
every lane has ended: a lane left running would deliver after the worker closed the adapter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from pipeline.config import DestinationConfig
from pipeline.delivery import DestinationRunner
from pipeline.destinations.base import DELIVERED, Destination, Event, NoOptions, Outcome
from pipeline.queue import DeliveryQueue
from pipeline.retry import Decision
from pipeline.store import Store
from stored_rows import add_delivery, add_event, opened_store, rows

BATCH = 5


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


class QueueFailingFirstRecord(DeliveryQueue):
    """The real queue, except that its first record() raises, as a database locked past its busy
    timeout would: a fake failure on a real store."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, "w1")
        self.failed = threading.Event()
        self._lock = threading.Lock()

    def record(self, lease: str, decisions: Sequence[tuple[int, Decision]]) -> None:
        with self._lock:
            first = not self.failed.is_set()
            self.failed.set()
        if first:
            raise OperationalError("UPDATE deliveries", {}, Exception("database is locked"))
        super().record(lease, decisions)


class LanesHeldFake(Destination):
    """A fake destination that answers the batch holding m0 once every lane holds a batch, and
    the others when the test releases them; it counts the calls made after close()."""

    def __init__(self, lanes: int) -> None:
        super().__init__("hook", NoOptions(), BATCH)
        self.lanes = lanes
        self.calls: list[list[str]] = []
        self.every_lane_busy = asyncio.Event()
        self.release = asyncio.Event()
        self.closed = False
        self.calls_after_close = 0

    @property
    def parallelism(self) -> int:
        return 2

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        sent = [e["messageId"] for e in events]
        self.calls.append(sent)
        self.calls_after_close += self.closed
        if len(self.calls) == self.lanes:
            self.every_lane_busy.set()
        await asyncio.wait_for((self.every_lane_busy if "m0" in sent else self.release).wait(), 30)
        return [DELIVERED] * len(events)

    async def close(self) -> None:
        self.closed = True


async def until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_one_failing_lane_ends_drain_only_after_the_others_recorded_their_batch(store: Store) -> None:
    delivery_ids = {f"m{i}": add_delivery(store, add_event(store, f"m{i}")) for i in range(40)}
    config = DestinationConfig(name="hook", type="fake", options=NoOptions(), batch_size=BATCH, claim_size=BATCH)
    queue = QueueFailingFirstRecord(store)
    adapter = LanesHeldFake(lanes=3)
    runner = DestinationRunner(config, adapter, queue, lease_seconds=60)
    # Two requests' worth of batches in hand, and a claim more; one lane more than that waits
    # for room.
    assert runner.in_hand_target() == adapter.lanes * BATCH and runner.lanes == adapter.lanes + 1

    async def main() -> set[asyncio.Task[Any]]:
        drain = asyncio.create_task(runner.drain(lambda: False))
        # The lane holding m0 fails to record while the three others still hold their batch;
        # they are let go only once that failure had time to reach drain.
        await until(queue.failed.is_set, "the first record to fail")
        await asyncio.sleep(0.3)
        adapter.release.set()
        with pytest.raises(OperationalError, match="database is locked"):
            await drain
        left_running = asyncio.all_tasks() - {asyncio.current_task()}
        await adapter.close()  # as Worker.stop() does once the job has ended
        await asyncio.sleep(1.0)  # time for a lane left running to claim and deliver again
        return left_running

    assert asyncio.run(main()) == set()
    assert adapter.calls_after_close == 0
    # One batch per lane at most: none claimed after the failure. (The fourth lane may have
    # claimed when m0's batch was answered, before its record failed.)
    assert 3 <= len(adapter.calls) <= runner.lanes
    states = {d["id"]: (d["state"], d["attempts"], d["locked_by"] is not None) for d in rows(store, "deliveries")}
    (failed_batch,) = [sent for sent in adapter.calls if "m0" in sent]
    for sent in adapter.calls:
        # The failed lane's outcome is lost: its rows come back when their lease runs out.
        expected = ("pending", 1, True) if sent is failed_batch else ("delivered", 1, False)
        assert [states.pop(delivery_ids[m]) for m in sent] == [expected] * BATCH
    assert set(states.values()) == {("pending", 0, False)}
    assert len(states) == 40 - len(adapter.calls) * BATCH


class QueueFailingEveryRecord(DeliveryQueue):
    """The real queue, except that every record() raises, each with its lane's lease in the error."""

    def record(self, lease: str, decisions: Sequence[tuple[int, Decision]]) -> None:
        raise OperationalError("UPDATE deliveries", {}, Exception(f"database is locked ({lease})"))


def test_when_several_lanes_fail_drain_raises_the_first_and_logs_the_others_in_one_line(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(4 * BATCH):
        add_delivery(store, add_event(store, f"m{i}"))
    config = DestinationConfig(name="hook", type="fake", options=NoOptions(), batch_size=BATCH, claim_size=BATCH)
    adapter = LanesHeldFake(lanes=4)
    adapter.release.set()  # every batch is answered once all four lanes hold one
    runner = DestinationRunner(config, adapter, QueueFailingEveryRecord(store, "w1"), lease_seconds=60)

    with caplog.at_level("WARNING", logger="trackrelay.delivery"), \
            pytest.raises(OperationalError, match="database is locked") as raised:
        asyncio.run(runner.drain(lambda: False))

    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=lane_failed")]
    # One line for the other three lanes (the first error is the job's, logged by the worker).
    assert "destination=hook lanes=3 " in line
    # Four distinct errors, one per lane: none is logged twice, none is lost.
    leases = [str(raised.value)] + line.split("errors=")[1].split("', '")
    assert len({text.split("(w1:")[1].split(")")[0] for text in leases}) == 4
    assert len(adapter.calls) == 4  # no lane claimed again after a failure


class CountingQueue(DeliveryQueue):
    """The real queue, counting its claims and how many came back empty."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, "w1")
        self.claims = self.empty = 0
        self._lock = threading.Lock()

    def claim(self, destination: str, limit: int, lease_ms: int) -> list[Any]:
        claimed = super().claim(destination, limit, lease_ms)
        with self._lock:
            self.claims += 1
            self.empty += not claimed
        return claimed


class ManyLanes(Destination):
    """Answers after a short wait, as a remote destination would; allows many requests at once,
    so the runner keeps many lanes (most of them waiting for room)."""

    def __init__(self) -> None:
        super().__init__("hook", NoOptions(), 1)

    @property
    def parallelism(self) -> int:
        return 4

    @property
    def max_parallelism(self) -> int:
        return 64

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        await asyncio.sleep(0.02)
        return [DELIVERED] * len(events)


def test_once_the_due_events_run_out_the_waiting_lanes_end_without_claiming(store: Store) -> None:
    """A claim that finds nothing ends the lanes waiting for room: each wake, or each drain,
    would otherwise make one empty claim per lane (a batch_size-100 webhook has 385)."""
    for n in range(20):
        add_delivery(store, add_event(store, f"m{n}"))
    config = DestinationConfig(name="hook", type="fake", options=NoOptions(), batch_size=1, claim_size=2)
    queue = CountingQueue(store)
    runner = DestinationRunner(config, ManyLanes(), queue, lease_seconds=60)
    assert runner.lanes > 40  # room for 4 requests now; lanes enough for 64

    async def main() -> int:
        return await runner.drain(lambda: False)

    assert asyncio.run(main()) == 20
    assert {r["state"] for r in rows(store, "deliveries")} == {"delivered"}
    # Ten claims of two, and a few that found nothing (lanes that were claiming when the
    # events ran out), not one per lane.
    assert queue.claims - queue.empty == 10, (queue.claims, queue.empty)
    assert queue.empty <= 6, (queue.claims, queue.empty, runner.lanes)
