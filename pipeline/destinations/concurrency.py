"""How many requests an HTTP destination gets at once: a fixed number, or an adaptive limit.

The adaptive limit is an AIMD controller in the spirit of Vector's adaptive request
concurrency (its RFC 1858): requests are observed in windows about one round trip long; at the
end of each window the limit

- is cut (multiplied by :data:`DECREASE`) when the window's mean round-trip time rose clearly
  above the baseline (the destination, or the path to it, is queueing our requests: more of
  them in flight would only wait longer);
- grows when the limit was reached during the window and the round trip stayed near the
  baseline: by one per window (additive increase), or, until the first cut, doubling each
  window (slow start, as TCP does) so that a destination 50 ms away reaches a hundred in
  flight in a second rather than in five;
- stays put otherwise (a destination with fewer requests to send than the limit gives no
  evidence that more would help).

Push-back (``429``, ``503``, a timeout, a refused or reset connection) cuts at once, not at
the window's end: a ``429`` comes back in a millisecond, and the sender would fill the rest of
the window with requests the destination refuses. One cut per round trip: push-back for a
request sent before the last cut was sent under the old limit and says nothing new (TCP does
the same).

The baseline is a moving average of the windows' round-trip times, so a destination that has
become slower for good is, after a few cuts, taken at its new speed and grows again. The first
cut after slow start halves the limit (slow start overshoots by up to twice what the
destination takes); later ones take a tenth off.

Round trips are measured by the sender from writing the request to reading the whole answer,
so they include the time this process takes to get to the answer: a worker whose event loop
is saturated sees its round trips grow and stops adding requests it could not process anyway.

Our own code (no library offers this for an asyncio client); the controller is a few numbers
updated once per answer, measured in bench R8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

ADAPTIVE = "adaptive"
DEFAULT_MAX_CONCURRENCY = 256
# Where an adaptive limit starts: the fixed default of earlier versions.
INITIAL_LIMIT = 8
# Multiplicative decrease after slow start; the first cut halves.
DECREASE = 0.9
# A window's mean round trip this much above the baseline (and above its usual spread) is a
# rise: queueing somewhere. Round trips on a busy box jitter by tens of percent.
RTT_TOLERANCE = 0.5
# Weight of the newest window in the baseline (Vector's default EWMA weight).
EWMA_ALPHA = 0.4
# Windows shorter than this would judge a loopback destination by a handful of answers.
MIN_WINDOW_SECONDS = 0.01


@dataclass(frozen=True)
class Snapshot:
    """What a controller reports (``trackrelay status``, the console, ``/metrics``)."""
    mode: str  # "adaptive" | "fixed"
    limit: int
    max_concurrency: int
    in_flight: int
    rtt_ms: float | None  # the last window's mean round trip
    baseline_rtt_ms: float | None
    cuts: int  # times the limit was cut
    back_pressure: int  # answers counted as push-back (429, 503, timeouts, refused connections)


class Concurrency:
    """A fixed limit; the base of :class:`AdaptiveConcurrency`. The sender calls
    :meth:`started` as a request goes out and :meth:`finished` when its answer (or error) came."""

    mode = "fixed"

    def __init__(self, limit: int, max_concurrency: int | None = None) -> None:
        self.limit = limit
        self.max_concurrency = max_concurrency or limit
        self.in_flight = 0
        self.rtt: float | None = None
        self.baseline: float | None = None
        self.cuts = 0
        self.back_pressure = 0
        # A fixed limit still reports its round trip: the mean over about a second.
        self._since = time.monotonic()
        self._rtt_sum = 0.0
        self._answers = 0

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, rtt: float, pushed_back: bool) -> None:
        self.in_flight -= 1
        if pushed_back:
            self.back_pressure += 1
            return
        self._rtt_sum += rtt
        self._answers += 1
        now = time.monotonic()
        if now - self._since >= 1.0 or self.rtt is None:
            self.rtt = self._rtt_sum / self._answers
            self._since, self._rtt_sum, self._answers = now, 0.0, 0

    def snapshot(self) -> Snapshot:
        return Snapshot(self.mode, self.limit, self.max_concurrency, self.in_flight,
                        None if self.rtt is None else self.rtt * 1000,
                        None if self.baseline is None else self.baseline * 1000, self.cuts, self.back_pressure)


class AdaptiveConcurrency(Concurrency):
    mode = ADAPTIVE

    def __init__(self, max_concurrency: int = DEFAULT_MAX_CONCURRENCY, initial: int = INITIAL_LIMIT,
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__(max(1, min(initial, max_concurrency)), max_concurrency)
        self._clock = clock or time.monotonic
        self._slow_start = True
        self._window_start = self._clock()
        self._window_rtt_sum = 0.0
        self._window_answers = 0
        self._window_reached_limit = False
        # Spread of the windows' round trips around the baseline (a moving mean deviation).
        self._deviation = 0.0
        self._last_cut = float("-inf")

    def started(self) -> None:
        self.in_flight += 1
        if self.in_flight >= self.limit:
            self._window_reached_limit = True

    def finished(self, rtt: float, pushed_back: bool) -> None:
        self.in_flight -= 1
        now = self._clock()
        if pushed_back:
            self.back_pressure += 1
            if now - rtt >= self._last_cut:  # sent under the current limit
                self._cut(now)
                self._start_window(now)
            return
        # A push-back's round trip says nothing about queueing (a 429 comes back at once, a
        # timeout after the timeout): only answers the destination worked on count.
        self._window_rtt_sum += rtt
        self._window_answers += 1
        if now - self._window_start >= max(self.baseline or 0.0, MIN_WINDOW_SECONDS):
            self._end_window(now)

    def _cut(self, now: float) -> None:
        factor = 0.5 if self._slow_start else DECREASE
        self.limit = max(1, math.floor(self.limit * factor))
        self._slow_start = False
        self.cuts += 1
        self._last_cut = now

    def _start_window(self, now: float) -> None:
        self._window_start = now
        self._window_rtt_sum = 0.0
        self._window_answers = 0
        self._window_reached_limit = self.in_flight >= self.limit

    def _end_window(self, now: float) -> None:
        mean = self._window_rtt_sum / self._window_answers if self._window_answers else None
        rose = False
        if mean is not None:
            self.rtt = mean
            if self.baseline is None:
                self.baseline = mean
            else:
                rose = mean > self.baseline * (1 + RTT_TOLERANCE) + 2 * self._deviation
                self._deviation = (1 - EWMA_ALPHA) * self._deviation + EWMA_ALPHA * abs(mean - self.baseline)
                self.baseline = (1 - EWMA_ALPHA) * self.baseline + EWMA_ALPHA * mean
        if rose:
            self._cut(now)
        elif self._window_reached_limit and mean is not None:
            grown = self.limit * 2 if self._slow_start else self.limit + 1
            self.limit = min(self.max_concurrency, grown)
        self._start_window(now)


def controller_for(concurrency: int | str, max_concurrency: int) -> Concurrency:
    """The controller a destination's ``concurrency`` setting asks for (validated before)."""
    if concurrency == ADAPTIVE:
        return AdaptiveConcurrency(max_concurrency)
    assert isinstance(concurrency, int)
    return Concurrency(concurrency)


def check_concurrency(concurrency: object, max_concurrency: object) -> str | None:
    """Why the two settings are wrong, or None."""
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
        return f"max_concurrency must be an integer of at least 1, got {max_concurrency!r}"
    if concurrency == ADAPTIVE:
        return None
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        return f'concurrency must be "adaptive" or an integer of at least 1, got {concurrency!r}'
    return None
