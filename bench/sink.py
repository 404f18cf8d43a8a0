"""A minimal Tornado sink for the webhook figures: every POST is answered 200 with no body.

It counts requests and events (occurrences of ``"messageId"``, so it never parses a body) and
the monotonic times of the first and last request. With ``--record`` (R6) it parses each body
and keeps the arrival time of every messageId. ``GET /stats`` and ``GET /arrivals`` return them.
Times are ``time.monotonic()``: CLOCK_MONOTONIC, the same clock in every process of the box.

    python -m bench.sink --port 9000 [--record]
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
    record: bool
    requests: int = 0
    events: int = 0
    first: float | None = None
    last: float | None = None
    arrivals: dict[str, float] = field(default_factory=dict)


class SinkHandler(RequestHandler):
    def initialize(self, tally: Tally) -> None:
        self.tally = tally

    def post(self, *_: Any) -> None:
        now = time.monotonic()
        tally = self.tally
        body = self.request.body
        tally.requests += 1
        tally.events += body.count(b'"messageId"')
        if tally.first is None:
            tally.first = now
        tally.last = now
        if tally.record:
            data = orjson.loads(body)
            for event in data["batch"] if "batch" in data else [data]:
                tally.arrivals.setdefault(event["messageId"], now)

    def get(self, *_: Any) -> None:
        tally = self.tally
        if self.request.path == "/arrivals":
            self.write(orjson.dumps(tally.arrivals))
        else:
            self.write({"requests": tally.requests, "events": tally.events, "first": tally.first,
                        "last": tally.last})


async def serve(port: int, record: bool) -> None:
    app = Application([(r"/.*", SinkHandler, {"tally": Tally(record)})], log_function=lambda _: None)
    await serve_until_signalled(app, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", action="store_true", help="keep each messageId's arrival time")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.record))


if __name__ == "__main__":
    main()
