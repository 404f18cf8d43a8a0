"""Per-source browser safety, once a request's sources are known: its ``Origin`` must be one
the source allows (``403`` otherwise), and it must fit the source's rate limits (``429``).

Requests without an ``Origin`` (servers, SDKs outside a browser, ``<img>`` pixels) pass the
origin check: only browsers send it, and only a browser's page can be made to send a public
key from somewhere else.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.messages import Problem
from pipeline.store import RowRefused, StoreUnavailable, now_ms
from receiver.commit import GroupCommitter
from receiver.cors import CorsPolicy
from receiver.ratelimit import RateLimiter, RefusalTally

log = logging.getLogger("trackrelay.receiver")

# The longest Retry-After a 429 names (the SDKs cap what they honour anyway: analytics-next 300 s).
MAX_RETRY_AFTER = 3600
# How often the refusals counted are written to `rejected` (one row per source and route).
TALLY_INTERVAL_SECONDS = 10.0
# Origin refusals recorded one by one per source and interval; the rest are counted.
ORIGIN_ROWS_PER_INTERVAL = 20
# The counted refusals: their status, and what the row's reason says of them.
TALLIED = {"rate_limited": (429, "over the rate limit"),
           "origin_not_allowed": (403, "from an origin not allowed"),
           "request_timeout": (408, "that did not arrive in time"),
           "buffers_full": (503, "while unfinished bodies filled max_buffered_bytes"),
           "too_many_connections": (503, "past max_connections")}


@dataclass(frozen=True)
class Refusal:
    problem: Problem
    source: str  # the source whose rule refused it
    retry_after: int = 0  # seconds, for a 429
    # Whether the caller records it as a rejected row of its own (with its input); else the
    # guard has counted it into the tally already.
    record: bool = False


def origin_refused(origin: str, source: str) -> Problem:
    return Problem("origin_not_allowed", "Origin not allowed",
                   f"source {source!r} does not take requests from origin {origin[:200]!r}",
                   status=403, error="Forbidden")


def rate_limited(source: str) -> Problem:
    return Problem("rate_limited", "Too many requests", f"source {source!r} is over its rate limit",
                   status=429, error="Too Many Requests")


class BrowserGuard:
    def __init__(self, config: Config, cors: CorsPolicy, refused: Callable[[str], None] = lambda code: None) -> None:
        self.cors = cors
        self.refused = refused  # counts every refusal tallied here, by code, for /metrics
        self.sources = {s.name: s for s in config.sources}
        self.limiter = RateLimiter(config.sources)
        self.tally = RefusalTally()
        self.origin_rows: dict[str, int] = {}
        self.checks_origins = any(s.allowed_origins for s in config.sources)
        # Off (the default): the ingest path does not even gather a request's sources.
        self.active = self.checks_origins or self.limiter.enabled

    def reconfigured(self, config: Config, cors: CorsPolicy) -> BrowserGuard:
        """This guard for a reloaded config: the origin lists and rate limits are the new ones
        (every token bucket starts full again, unchanged sources' too), while the refusals
        counted so far, and whatever counts them, go on (the running tally task writes them)."""
        fresh = BrowserGuard(config, cors)
        kept = copy.copy(self)
        kept.cors, kept.sources, kept.limiter = fresh.cors, fresh.sources, fresh.limiter
        kept.checks_origins, kept.active = fresh.checks_origins, fresh.active
        return kept

    def check(self, origin: str | None, sources: Sequence[str], client: str | None, route: str) -> Refusal | None:
        """None if the request may go on; else why not. A refused request takes no tokens."""
        if origin is not None and self.checks_origins:
            for name in sources:
                if not self.cors.source_allows(self.sources.get(name), origin):
                    return Refusal(origin_refused(origin, name), name, record=self._record_origin_refusal(name, route))
        if self.limiter.enabled:
            wait = self.limiter.admit(sources, client or "")
            if wait > 0:
                source = next(name for name in sources if name in self.limiter.limits)
                self.count(source, route, "rate_limited")
                return Refusal(rate_limited(source), source, retry_after=min(MAX_RETRY_AFTER, max(1, math.ceil(wait))))
        return None

    def _record_origin_refusal(self, source: str, route: str) -> bool:
        """The first few origin refusals of each source per interval are recorded one by one
        (with their input); past that they are counted, so that a flood with a forged Origin
        costs a row an interval, not a row a request."""
        seen = self.origin_rows.get(source, 0)
        if seen < ORIGIN_ROWS_PER_INTERVAL:
            self.origin_rows[source] = seen + 1
            return True
        self.count(source, route, "origin_not_allowed")
        return False

    def count(self, source: str, route: str, code: str) -> None:
        """Count a refusal of a kind in TALLIED into the next tally rows."""
        self.tally.add(source, route, code, now_ms())
        self.refused(code)

    async def write_tally(self, committer: GroupCommitter) -> None:
        """One `rejected` row per source, route and kind for the refusals counted."""
        since, counts = self.tally.take()
        self.origin_rows = {}
        if not counts:
            return
        until = now_ms()
        for (source, route, code), count in sorted(counts.items()):
            status, what = TALLIED[code]
            whose = f" of source {source!r}" if source else ""  # a timed-out body's key was never read
            row = {"received_at_ms": until, "route": route, "source": source or None, "status": status,
                   "code": code, "remote_addr": None, "raw": None,
                   "reason": f"{count} request(s) {what}{whose} refused with {status} "
                             f"in the {(until - (since or until)) / 1000:.1f} s before this row"}
            log.warning("event=%s source=%s route=%s refused=%d", code, source, route, count)
            try:
                await committer.commit("rejected", row)
            except (StoreUnavailable, RowRefused) as exc:
                log.warning("event=rejected_not_recorded code=%s count=%d error=%r", code, count, str(exc))

    async def run_tally(self, committer: GroupCommitter, stop: asyncio.Event) -> None:
        """Write the tally every interval until ``stop``, then once more."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), TALLY_INTERVAL_SECONDS)
            except asyncio.TimeoutError:
                pass
            await self.write_tally(committer)
