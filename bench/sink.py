"""The webhook figures' sink: every POST is answered (200, no body, by default) and counted.

It counts requests and events (occurrences of ``"messageId"``, so it never parses a body) and
the monotonic times of the first and last request. With ``--record`` (R6) it parses each body
and keeps the arrival time of every messageId. Times are ``time.monotonic()``: CLOCK_MONOTONIC,
the same clock in every process of the box.

By default it is a Tornado app answering at once, as R5 and R6 have always measured it. The
options that make it a slow or limited destination (R8-R10) run it on a plain asyncio
protocol instead (``bench.sink_protocol``, uvloop when installed), which keeps up with far
more requests in flight than Tornado does:

- ``--latency-ms MS``: every POST is answered MS after it arrived (a timer, not a task; any
  number in flight, keep-alive).
- ``--capacity N``: a POST arriving while N are in flight is answered 429 at once (counted as
  ``rejected``; its events are not counted).
- ``--status CODE``: answer CODE instead of 200 (R10's failing destination).
- ``--never-answer``: keep every POST unanswered until the client gives up (R10's timeouts).
- ``POST /control {"latency_ms": 200, "capacity": 0, "status": 200}``: change them mid-run.

``GET /stats``: requests, rejected, events, answered, abandoned (unanswered when the client
closed), in_flight, peak_in_flight, in_flight_seconds (in-flight integrated over time, up to
``now``: two snapshots give the time-averaged in-flight between them), first, last, now.
``GET /arrivals``: the recorded arrival times.

    python -m bench.sink --port 9000 [--record] [--latency-ms 50] [--capacity 16] [--engine asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from bench.serving import serve_until_signalled
from tornado.web import Application, RequestHandler


@dataclass
class Tally:
    """What the sink has seen, and how it answers (changed by ``/control``)."""

    record: bool = False
    latency: float = 0.0  # seconds before a POST is answered
    capacity: int = 0  # most POSTs in flight; 0: no limit
    status: int = 200
    never_answer: bool = False
    requests: int = 0
    rejected: int = 0
    events: int = 0
    answered: int = 0
    abandoned: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    first: float | None = None
    last: float | None = None
    arrivals: dict[str, float] = field(default_factory=dict)
    _in_flight_seconds: float = 0.0
    _changed: float = field(default_factory=time.monotonic)

    def _advance(self, now: float) -> None:
        self._in_flight_seconds += self.in_flight * (now - self._changed)
        self._changed = now

    def arrive(self, body: bytes, now: float) -> bool:
        """Count a POST; False when it is over capacity (to be answered 429)."""
        self.requests += 1
        if self.first is None:
            self.first = now
        self.last = now
        if self.capacity and self.in_flight >= self.capacity:
            self.rejected += 1
            return False
        self._advance(now)
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        self.events += body.count(b'"messageId"')
        if self.record:
            data = orjson.loads(body)
            for event in data["batch"] if "batch" in data else [data]:
                self.arrivals.setdefault(event["messageId"], now)
        return True

    def leave(self, now: float, answered: bool = True) -> None:
        """An admitted POST was answered (or its client went away first)."""
        self._advance(now)
        self.in_flight -= 1
        if answered:
            self.answered += 1
        else:
            self.abandoned += 1

    def control(self, settings: dict[str, Any]) -> None:
        if "latency_ms" in settings:
            self.latency = float(settings["latency_ms"]) / 1000
        if "capacity" in settings:
            self.capacity = int(settings["capacity"])
        if "status" in settings:
            self.status = int(settings["status"])
        if "never_answer" in settings:
            self.never_answer = bool(settings["never_answer"])

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        self._advance(now)
        return {"requests": self.requests, "rejected": self.rejected, "events": self.events,
                "answered": self.answered, "abandoned": self.abandoned, "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight, "in_flight_seconds": self._in_flight_seconds,
                "first": self.first, "last": self.last, "now": now, "latency_ms": self.latency * 1000,
                "capacity": self.capacity, "status": self.status}


class SinkHandler(RequestHandler):
    """The Tornado engine: answers at once, so nothing is ever in flight between two requests."""

    def initialize(self, tally: Tally) -> None:
        self.tally = tally

    def post(self, *_: Any) -> None:
        now = time.monotonic()
        if self.request.path == "/control":
            self.tally.control(orjson.loads(self.request.body))
            return
        if self.tally.arrive(self.request.body, now):
            self.tally.leave(now)
            if self.tally.status != 200:
                self.set_status(self.tally.status)
        else:
            self.set_status(429)

    def get(self, *_: Any) -> None:
        if self.request.path == "/arrivals":
            self.write(orjson.dumps(self.tally.arrivals))
        else:
            self.write(self.tally.snapshot())


async def serve_tornado(port: int, tally: Tally) -> None:
    app = Application([(r"/.*", SinkHandler, {"tally": tally})], log_function=lambda _: None)
    await serve_until_signalled(app, port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", action="store_true", help="keep each messageId's arrival time")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="answer each POST this late")
    parser.add_argument("--capacity", type=int, default=0, help="answer 429 beyond this many in flight")
    parser.add_argument("--status", type=int, default=200, help="the status every POST is answered")
    parser.add_argument("--never-answer", action="store_true", help="never answer a POST")
    parser.add_argument("--engine", choices=["auto", "tornado", "asyncio"], default="auto",
                        help="auto: Tornado unless an option above needs requests in flight")
    return parser


def main() -> None:
    args = _parser().parse_args()
    tally = Tally(record=args.record, latency=args.latency_ms / 1000, capacity=args.capacity,
                  status=args.status, never_answer=args.never_answer)
    engine = args.engine
    if engine == "auto":
        plain = not (args.latency_ms or args.capacity or args.never_answer or args.status != 200)
        engine = "tornado" if plain else "asyncio"
    if engine == "tornado":
        if args.latency_ms or args.never_answer:
            raise SystemExit("bench.sink: --latency-ms and --never-answer need --engine asyncio")
        asyncio.run(serve_tornado(args.port, tally))
    else:
        from bench.sink_protocol import run

        run(args.port, tally)


if __name__ == "__main__":
    main()
