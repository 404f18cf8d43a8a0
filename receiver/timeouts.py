"""Bodies that never finish: a ``Content-Length`` larger than what is sent, ``Expect:
100-continue`` and then nothing, a chunked body that goes silent, a trickle of a byte a second.
Each would hold a connection (and its buffers) for as long as the client likes.

One sweep a second looks at the ingest requests whose body is still arriving (nginx's
``client_body_timeout``, but for the whole body, with a minimum rate): a body not whole within
``body_timeout_seconds``, or slower than ``body_min_rate_bytes`` a second on average once
``body_rate_grace_seconds`` have passed, is answered ``408`` (the connection closes after it)
and counted into the rejected tally (one row per source and route an interval, as the rate
limits are). One sweep rather than a timer per request: the hot path only notes a start time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Protocol

from pipeline.config import ReceiverConfig
from pipeline.heap import release_free_memory
from pipeline.messages import Problem
from receiver.body import BodyBudget

SWEEP_SECONDS = 1.0


def body_timed_out(elapsed: float) -> Problem:
    return Problem("request_timeout", "Request timeout",
                   f"the request body did not arrive in time ({elapsed:.0f} s)", status=408,
                   error="Request Timeout")


class ArrivingBody(Protocol):
    """What the sweep needs of a request whose body is being read (receiver/ingest.py)."""

    def body_progress(self) -> tuple[float, int] | None:
        """(started at, bytes received so far), or None once the body is whole or answered."""

    def time_out(self, problem: Problem) -> None:
        """Answer the problem now and close the connection."""

    def rest_if_stalled(self) -> None:
        """Let go of what can be rebuilt (a compressed body's inflater) if nothing came lately."""


def too_slow(receiver: ReceiverConfig, started: float, received: int, now: float) -> bool:
    elapsed = now - started
    if elapsed > receiver.body_timeout_seconds:
        return True
    past_grace = elapsed - receiver.body_rate_grace_seconds
    return receiver.body_min_rate_bytes > 0 and past_grace > 0 and \
        received < receiver.body_min_rate_bytes * elapsed


async def sweep_bodies(receiver: ReceiverConfig, requests: Iterable[ArrivingBody], budget: BodyBudget,
                       stop: asyncio.Event) -> None:
    """Until ``stop``: every second, time out the bodies that are too slow, let the stalled ones
    rest, and give the memory of the ones gone back to the system when enough went."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)
        except asyncio.TimeoutError:
            pass
        now = time.monotonic()
        for request in list(requests):
            state = request.body_progress()
            if state is None:
                continue
            if too_slow(receiver, state[0], state[1], now):
                request.time_out(body_timed_out(now - state[0]))
            else:
                request.rest_if_stalled()
        if budget.trim_due():
            release_free_memory()
