"""Delivering one destination's due events: claim, call the adapter under a renewed lease,
decide each outcome with the retry policy, record them all in one transaction.

Several claim lanes run side by side. For an adapter that sends requests concurrently (the
HTTP ones), the lanes together keep about one and a half times its current limit's worth of
events in hand (``parallelism`` requests of ``batch_size``, plus half again, at least one
claim): enough that its senders never wait for a claim, however the adaptive limit moves, and
no more, so that leases are not taken far ahead of sending and memory does not grow with the
backlog. An event counts as in hand from its claim until its answer came (not until its batch
is recorded), so a lane waiting for the last answers of its claim does not hold the others back.
Once a claim finds nothing due, the lanes waiting for room end instead of claiming in turn;
new events (``wake``) start them again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.config import DestinationConfig
from pipeline.destinations.base import Destination, Event, Outcome, StoredJson, retry
from pipeline.logs import Throttled
from pipeline.metrics import count_attempts
from pipeline.queue import Claimed, DeliveryQueue
from pipeline.retry import DEAD, BackoffPolicy
from pipeline.store import now_ms, short_error

log = logging.getLogger("trackrelay.delivery")
T = TypeVar("T")


class DestinationRunner:
    def __init__(self, config: DestinationConfig, adapter: Destination, queue: DeliveryQueue,
                 lease_seconds: float) -> None:
        self.config = config
        self.adapter = adapter
        self.queue = queue
        self.policy = BackoffPolicy.for_destination(config)
        self.lease_ms = int(lease_seconds * 1000)
        # Lines that come once per lane or per event when the destination is in trouble.
        self.throttled = Throttled(log)
        # Events claimed and not yet answered, by every lane; and the lanes waiting, in turn,
        # for room under the in-hand target.
        self.unanswered = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        # The lanes of the drain under way, and how to start more (None between drains).
        self._running: set[asyncio.Future[None]] = set()
        self._start_lanes: Callable[[], None] | None = None
        # Set when a claim came back empty (the due events ran out), cleared by wake (new
        # ones came): a lane that waited for room then ends instead of claiming. Without it
        # each wake let every waiting lane make a claim that found nothing, one after
        # another: a batch_size-100 webhook has 385 lanes, and in R9's steady trickle on
        # Postgres claims were 46% of the executor threads' time.
        self._ran_dry = False
        # SQLite takes one write at a time: a destination with many lanes kept as many claims
        # and records in line as it had lanes, and a one-lane destination (file, database)
        # got one turn in dozens (with a webhook at 20k deliveries/s, a database destination
        # got 1-2k). With one transaction in line per destination, they take turns.
        self._store_turn = asyncio.Lock() if queue.store.backend == "sqlite" else None

    @property
    def concurrent(self) -> bool:
        return self.adapter.max_parallelism > 1

    def in_hand_target(self, parallelism: int | None = None) -> int:
        """Events to keep claimed and unanswered for ``parallelism`` requests in flight."""
        wanted = (parallelism or self.adapter.parallelism) * self.config.batch_size
        return wanted + max(self.config.claim_size, wanted // 2)

    @property
    def lanes(self) -> int:
        """Claim loops run side by side: as many claims as the largest in-hand target holds,
        and one more, so a lane records while the others keep every request busy. A
        one-at-a-time adapter (file, database) has one lane per claim its batch needs."""
        if not self.concurrent:
            return max(1, -(-self.config.batch_size // self.config.claim_size))
        return -(-self.in_hand_target(self.adapter.max_parallelism) // self.config.claim_size) + 1

    async def drain(self, stopping: Callable[[], bool]) -> int:
        """Deliver due events until none is left (or the worker stops); return how many were tried.

        Raises the first lane's error (a claim or record that failed), but only once every lane
        has ended: the others claim no more, and finish and record the batch they hold. A lane
        left running would go on delivering untracked, after the worker closed the adapter."""
        errors: list[Exception] = []
        tried = [0]

        def lanes_stop() -> bool:
            return bool(errors) or stopping()

        async def lane() -> None:
            try:
                # Not `tried[0] += await ...`: that reads tried[0] before the await, and a lane
                # ending later would put back the count from before the others added theirs.
                count = await self._drain_lane(lanes_stop)
                tried[0] += count
            except Exception as exc:
                errors.append(exc)

        def start_lanes() -> None:
            # A lane that finds nothing ends; under a steady inflow all but one would be gone
            # while events keep arriving, so new events (wake) start lanes up to the count again.
            self._running = {task for task in self._running if not task.done()}
            while len(self._running) < self.lanes and not lanes_stop():
                self._running.add(asyncio.ensure_future(lane()))

        self._start_lanes = start_lanes
        self._ran_dry = False  # a new drain claims afresh (events may have come since the last)
        try:
            start_lanes()
            while running := [task for task in self._running if not task.done()]:
                await asyncio.wait(running)
        finally:
            self._start_lanes = None
        if errors:
            if len(errors) > 1:  # the first one is the job's error, logged by the worker
                others = list(dict.fromkeys(short_error(other) for other in errors[1:]))
                self.throttled.warning("lane_failed", "event=lane_failed destination=%s lanes=%d errors=%r",
                                       self.config.name, len(errors) - 1, others[:5])
            raise errors[0]
        return tried[0]

    def wake(self) -> None:
        """New events are due (the decoder stored some): during a drain, start lanes again up to
        the lane count; otherwise nothing (the worker runs the job)."""
        self._ran_dry = False
        if self._start_lanes is not None:
            self._start_lanes()

    async def _claim_size(self, stopping: Callable[[], bool]) -> int:
        """How many events this lane claims next (0: the worker is stopping): waits while the
        destination asked for a pause, or while the lanes hold their target already."""
        while not stopping():
            paused = self.adapter.pause_seconds()
            if paused > 0:
                await asyncio.sleep(min(paused, 1.0))  # short steps: stopping is seen at once
                continue
            if not self.concurrent:
                return self.config.claim_size
            room = self.in_hand_target() - self.unanswered
            if room > 0:
                # Whole batches, one claim at most.
                batch = self.config.batch_size
                return min(self.config.claim_size, max(batch, room // batch * batch))
            await self._wait_turn()
            if self._ran_dry:
                break  # the due events ran out while it waited: wake starts lanes for new ones
        return 0

    async def _wait_turn(self) -> None:
        """Wait in line until an answer makes room (or a second passes). An answer wakes one
        lane per claim of room, not every lane: a batch_size-100 destination has hundreds of
        lanes, and waking them all at each answer cost more CPU than the deliveries."""
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await asyncio.wait_for(turn, 1.0)  # a plain future: no task per wait
        except asyncio.TimeoutError:
            pass  # look at stopping, the pause and the limit again

    def _answered(self, count: int) -> None:
        self.unanswered -= count
        room = self.in_hand_target() - self.unanswered
        while room > 0 and self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():  # not timed out meanwhile
                turn.set_result(None)
                room -= self.config.claim_size

    async def _drain_lane(self, stopping: Callable[[], bool]) -> int:
        tried = 0
        while True:
            size = await self._claim_size(stopping)
            if not size:
                break
            self.unanswered += size  # reserved before the claim, so that lanes claiming at once share the room
            try:
                claimed = await self._in_turn(self.queue.claim, self.config.name, size, self.lease_ms)
            finally:
                self._answered(size)
            if not claimed:
                self._ran_dry = True  # none left due now: lanes waiting for room end (see __init__)
                break  # new events start lanes again (wake)
            self.unanswered += len(claimed)  # each chunk's answer takes its share off
            outcomes = await self._deliver_under_lease(claimed)
            now = now_ms()
            decisions = [(c.id, self.policy.decide(o, c.attempts, c.created_at_ms, now))
                         for c, o in zip(claimed, outcomes)]
            await self._in_turn(self.queue.record, claimed[0].lease, decisions)
            count_attempts(self.config.name, [(o.kind, d.state, c.received_at_ms)
                                              for c, o, (_, d) in zip(claimed, outcomes, decisions)], now)
            dead = [(c, d) for c, (_, d) in zip(claimed, decisions) if d.state == DEAD]
            for item, decision in dead[:5]:
                self.throttled.warning("delivery_dead",
                                  "event=delivery_dead destination=%s message_id=%s attempts=%d error=%r",
                                  self.config.name, item.event.get("messageId"), item.attempts,
                                  (decision.error or "")[:200])
            tried += len(claimed)
        return tried

    async def _in_turn(self, call: Callable[..., T], *args: object) -> T:
        if self._store_turn is None:
            return await asyncio.to_thread(call, *args)
        async with self._store_turn:
            return await asyncio.to_thread(call, *args)

    async def _deliver_under_lease(self, claimed: Sequence[Claimed]) -> list[Outcome]:
        """Call the adapter while renewing the lease, so a slow destination never causes a
        second delivery by another lane or worker."""
        renewer = asyncio.create_task(self._renew_until_cancelled(claimed[0].lease, [c.id for c in claimed]))
        try:
            events = [StoredJson(c.payload) for c in claimed] if self.adapter.takes_stored_json \
                else [c.event for c in claimed]
            return await deliver_in_batches(self.adapter, events, self.config.batch_size, self._answered)
        finally:
            renewer.cancel()
            try:
                await renewer
            except asyncio.CancelledError:
                pass

    async def _renew_until_cancelled(self, lease: str, ids: list[int]) -> None:
        """Renew every third of the lease, so one failed renewal (a locked or unreachable
        database) still leaves the next one in time. Never give up after a failure: the lease
        would run out under the delivery in flight and another lane would send it again. A
        failure is logged once per batch, not at every interval."""
        failed, still_held = False, len(ids)
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                held = await asyncio.to_thread(self.queue.renew, lease, ids, self.lease_ms)
            except Exception as exc:
                if not failed:
                    log.warning("event=lease_renew_failed destination=%s lease=%s deliveries=%d error=%r "
                                "detail='retried every %.1f s; if the lease runs out, another lane or worker "
                                "may send these events again'", self.config.name, lease, len(ids),
                                short_error(exc), self.lease_ms / 3000)
                failed = True
                continue
            if held < still_held:
                log.warning("event=lease_lost destination=%s lease=%s deliveries=%d held=%d "
                            "detail='the lease ran out before it was renewed: these events may be sent twice, "
                            "and only their new holder records the outcome'",
                            self.config.name, lease, len(ids), held)
                still_held = held
            if not held:
                return  # a lost lease never comes back: its token is not handed out again


async def deliver_in_batches(adapter: Destination, events: Sequence[Event], batch_size: int,
                             answered: Callable[[int], None] | None = None) -> list[Outcome]:
    """Every chunk of ``batch_size`` to the adapter at once; ``answered(n)`` is told as each
    chunk's outcomes come (the claim side keeps claiming as answers come, not per claim)."""
    chunks = [list(events[i:i + batch_size]) for i in range(0, len(events), batch_size)]

    async def one(chunk: list[Event]) -> list[Outcome]:
        try:
            return await deliver_isolating(adapter, chunk)
        finally:
            if answered is not None:
                answered(len(chunk))

    results = await asyncio.gather(*(one(chunk) for chunk in chunks))
    return [outcome for result in results for outcome in result]


async def deliver_isolating(adapter: Destination, chunk: list[Event]) -> list[Outcome]:
    """One adapter call; when it fails a whole batch (rejects every event for one reason, or
    raises), split it until the bad event is alone, so one poison event never takes its
    neighbours down with it. A whole batch answered "retry" is not split: that is what an
    outage looks like, and splitting would multiply the requests to a destination that is down."""
    try:
        outcomes = list(await adapter.deliver(chunk))
    except Exception as exc:  # an adapter bug or an unexpected error: isolate, then try again later
        if len(chunk) > 1:
            middle = len(chunk) // 2
            left, right = await asyncio.gather(deliver_isolating(adapter, chunk[:middle]),
                                               deliver_isolating(adapter, chunk[middle:]))
            return left + right
        log.error("event=adapter_error destination=%s error=%r", adapter.name, f"{type(exc).__name__}: {exc}"[:300],
                  exc_info=exc)
        return [retry(f"{type(exc).__name__}: {exc}")]
    if len(outcomes) != len(chunk):
        reason = f"adapter returned {len(outcomes)} outcomes for {len(chunk)} events"
        log.error("event=adapter_error destination=%s error=%r", adapter.name, reason)
        return [retry(reason)] * len(chunk)
    if len(chunk) > 1 and all(o.kind == "rejected" for o in outcomes) and len({o.reason for o in outcomes}) == 1:
        middle = len(chunk) // 2
        left, right = await asyncio.gather(deliver_isolating(adapter, chunk[:middle]),
                                           deliver_isolating(adapter, chunk[middle:]))
        return left + right
    return outcomes
