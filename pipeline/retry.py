"""Retry policy as data, decided in one place: capped exponential backoff with full jitter,
a maximum number of attempts and a maximum age, then the dead-letter state."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.config import DestinationConfig
from pipeline.destinations.base import Outcome

# Huge error rows hurt (RudderStack learned it): keep the first few KB of the last error.
MAX_ERROR_CHARS = 2048

DELIVERED, PENDING, DEAD = "delivered", "pending", "dead"


@dataclass(frozen=True)
class Decision:
    """What becomes of one delivery after an attempt."""

    state: str  # DELIVERED, PENDING (to be retried at next_attempt_at_ms) or DEAD
    next_attempt_at_ms: int | None = None
    error: str | None = None


DELIVERED_DECISION = Decision(DELIVERED)


@dataclass(frozen=True)
class BackoffPolicy:
    max_attempts: int = 10
    initial_seconds: float = 1.0
    max_seconds: float = 300.0
    max_age_seconds: float = 10800.0

    @classmethod
    def for_destination(cls, dest: DestinationConfig) -> BackoffPolicy:
        return cls(dest.max_attempts, dest.retry_initial_seconds, dest.retry_max_seconds, dest.max_age_seconds)

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based): full jitter."""
        # The exponent is capped: 2**64 seconds is past any max_seconds, and 2.0**1024 overflows.
        ceiling = min(self.max_seconds, self.initial_seconds * 2.0 ** min(max(attempts - 1, 0), 64))
        return (rng or random).uniform(0, ceiling)

    def decide(self, outcome: Outcome, attempts: int, created_at_ms: int, now_ms: int,
               rng: random.Random | None = None) -> Decision:
        """``attempts`` counts the attempt that produced ``outcome``."""
        if outcome.delivered:
            return DELIVERED_DECISION  # frozen: one for all, not one per delivered event
        error = outcome.reason[:MAX_ERROR_CHARS] or outcome.kind
        if outcome.kind == "rejected":
            return Decision(DEAD, error=f"rejected: {error}"[:MAX_ERROR_CHARS])
        if attempts >= self.max_attempts:
            return Decision(DEAD, error=f"gave up after {attempts} attempts: {error}"[:MAX_ERROR_CHARS])
        wait = outcome.retry_after if outcome.retry_after is not None else self.delay(attempts, rng)
        next_at = now_ms + int(wait * 1000)
        if next_at > created_at_ms + int(self.max_age_seconds * 1000):
            return Decision(DEAD, error=f"too old to retry after {attempts} attempts: {error}"[:MAX_ERROR_CHARS])
        return Decision(PENDING, next_at, error)
