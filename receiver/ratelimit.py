"""Per-source request rate limits (token buckets), and the tally of what they refused.

Each source may limit requests a second for the whole source (``rate_limit_per_second``,
``rate_limit_burst``) and for each client address using it (``client_rate_limit_...``; IPv6
clients by their /64), as
nginx's ``limit_req`` does: a request takes one token; an empty bucket answers ``429`` with
``Retry-After`` (when the next token is due, whole seconds). Buckets live in this process's
memory: each receiver process limits on its own, so with ``--processes N`` a source may get up
to N times its rate.

Refusals are counted, not recorded one by one (a flood would otherwise write a row per refused
request, the very load the limit is there to stop): :class:`RefusalTally` writes one
``rate_limited`` row to ``rejected`` per source and interval, with the count.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from pipeline.config import SourceConfig

# Client buckets kept at most (oldest dropped first: a dropped bucket is a full one again,
# which only forgives a client that has not been seen for longest).
MAX_CLIENT_BUCKETS = 100_000


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst or max(1, math.ceil(rate)))
        self.tokens, self.stamp = self.burst, now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now). Takes nothing."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


def client_key(address: str) -> str:
    """Whose bucket a client address fills: an IPv6 client by its /64, the block one site or
    line is given, so that rotating addresses inside it does not make a new client each time."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False).network_address)
    except ValueError:
        return address


class SourceLimits:
    """The buckets of one source: its own, and one per client address."""

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.whole: TokenBucket | None = None
        self.clients: OrderedDict[str, TokenBucket] = OrderedDict()

    def buckets(self, client: str, now: float) -> list[TokenBucket]:
        found = []
        if self.source.rate_limit_per_second:
            if self.whole is None:
                self.whole = TokenBucket(self.source.rate_limit_per_second, self.source.rate_limit_burst, now)
            found.append(self.whole)
        if self.source.client_rate_limit_per_second:
            client = client_key(client)
            bucket = self.clients.get(client)
            if bucket is None:
                bucket = self.clients[client] = TokenBucket(self.source.client_rate_limit_per_second,
                                                            self.source.client_rate_limit_burst, now)
                if len(self.clients) > MAX_CLIENT_BUCKETS:
                    self.clients.popitem(last=False)
            else:
                self.clients.move_to_end(client)
            found.append(bucket)
        return found


class RateLimiter:
    def __init__(self, sources: Sequence[SourceConfig], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.limits = {s.name: SourceLimits(s) for s in sources
                       if s.rate_limit_per_second or s.client_rate_limit_per_second}

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def admit(self, sources: Sequence[str], client: str) -> float:
        """Take a token from every bucket the request falls under and return 0, or take none
        and return the seconds until all of them have one."""
        if not self.limits:
            return 0.0
        now = self.clock()
        buckets = [b for name in sources if name in self.limits for b in self.limits[name].buckets(client, now)]
        wait = max((bucket.wait(now) for bucket in buckets), default=0.0)
        if wait == 0.0:
            for bucket in buckets:
                bucket.take()
        return wait


class RefusalTally:
    """Refused requests counted per (source, route, code), written out as one row each interval."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.since_ms: int | None = None

    def add(self, source: str, route: str, code: str, now_ms: int) -> None:
        if self.since_ms is None:
            self.since_ms = now_ms
        key = (source, route, code)
        self.counts[key] = self.counts.get(key, 0) + 1

    def take(self) -> tuple[int | None, dict[tuple[str, str, str], int]]:
        """What was counted since when, and start again."""
        since, counts = self.since_ms, self.counts
        self.since_ms, self.counts = None, {}
        return since, counts
