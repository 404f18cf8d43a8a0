"""Delivering one destination's due events: claim, call the adapter under a renewed lease,
decide each outcome with the retry policy, record them all in one transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from pipeline.config import DestinationConfig
from pipeline.destinations.base import Destination, Event, Outcome, retry
from pipeline.logs import Throttled
from pipeline.metrics import count_attempts
from pipeline.queue import Claimed, DeliveryQueue
from pipeline.retry import DEAD, BackoffPolicy
from pipeline.store import now_ms, short_error

log = logging.getLogger("trackrelay.delivery")


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

    @property
    def lanes(self) -> int:
        """Claim loops run side by side: enough batches in hand to keep every one of the
        adapter's concurrent requests busy, while each claim stays ``claim_size`` rows."""
        wanted = self.adapter.parallelism * self.config.batch_size
        lanes = -(-wanted // self.config.claim_size)
        # A concurrent adapter gets two lanes more, so some lanes claim and record (and finish
        # the tail of their batch) while the others keep every connection busy.
        return lanes + 2 if self.adapter.parallelism > 1 else max(1, lanes)

    async def drain(self, stopping: Callable[[], bool]) -> int:
        """Deliver due events until none is left (or the worker stops); return how many were tried.

        Raises the first lane's error (a claim or record that failed), but only once every lane
        has ended: the others claim no more, and finish and record the batch they hold. A lane
        left running would go on delivering untracked, after the worker closed the adapter."""
        errors: list[Exception] = []

        def lanes_stop() -> bool:
            return bool(errors) or stopping()

        async def lane() -> int:
            try:
                return await self._drain_lane(lanes_stop)
            except Exception as exc:
                errors.append(exc)
                return 0

        counts = await asyncio.gather(*(lane() for _ in range(self.lanes)))
        if errors:
            if len(errors) > 1:  # the first one is the job's error, logged by the worker
                others = list(dict.fromkeys(short_error(other) for other in errors[1:]))
                self.throttled.warning("lane_failed", "event=lane_failed destination=%s lanes=%d errors=%r",
                                       self.config.name, len(errors) - 1, others[:5])
            raise errors[0]
        return sum(counts)

    async def _drain_lane(self, stopping: Callable[[], bool]) -> int:
        tried = 0
        while not stopping():
            claimed = await asyncio.to_thread(self.queue.claim, self.config.name, self.config.claim_size,
                                              self.lease_ms)
            if not claimed:
                break
            outcomes = await self._deliver_under_lease(claimed)
            now = now_ms()
            decisions = [(c.id, self.policy.decide(o, c.attempts, c.created_at_ms, now))
                         for c, o in zip(claimed, outcomes)]
            await asyncio.to_thread(self.queue.record, claimed[0].lease, decisions)
            count_attempts(self.config.name, [(o.kind, d.state, c.event.get("receivedAt"))
                                              for c, o, (_, d) in zip(claimed, outcomes, decisions)],
                           datetime.now(timezone.utc))
            dead = [(c, d) for c, (_, d) in zip(claimed, decisions) if d.state == DEAD]
            for item, decision in dead[:5]:
                self.throttled.warning("delivery_dead",
                                  "event=delivery_dead destination=%s message_id=%s attempts=%d error=%r",
                                  self.config.name, item.event.get("messageId"), item.attempts,
                                  (decision.error or "")[:200])
            tried += len(claimed)
        return tried

    async def _deliver_under_lease(self, claimed: Sequence[Claimed]) -> list[Outcome]:
        """Call the adapter while renewing the lease, so a slow destination never causes a
        second delivery by another lane or worker."""
        renewer = asyncio.create_task(self._renew_until_cancelled(claimed[0].lease, [c.id for c in claimed]))
        try:
            return await deliver_in_batches(self.adapter, [c.event for c in claimed], self.config.batch_size)
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


async def deliver_in_batches(adapter: Destination, events: Sequence[Event], batch_size: int) -> list[Outcome]:
    chunks = [list(events[i:i + batch_size]) for i in range(0, len(events), batch_size)]
    results = await asyncio.gather(*(deliver_isolating(adapter, chunk) for chunk in chunks))
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
