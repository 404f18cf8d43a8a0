"""A real HTTP sink for destination tests: Tornado on a loopback port, served from a thread.

It records every request (path, headers, body, the client's port) and answers what the test
scripts: ``sink.answers`` maps each recorded request to an :class:`Answer` (200 by default),
optionally after a delay. It also counts the requests in flight at once.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int

    def json(self) -> Any:
        raw = gzip.decompress(self.body) if self.headers.get("Content-Encoding") == "gzip" else self.body
        return json.loads(raw)


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to hold the answer back (released early when the sink stops).
    delay: float = 0.0


class SinkHandler(RequestHandler):
    def initialize(self, sink: HttpSink) -> None:
        self.sink = sink

    async def post(self, *_: Any) -> None:
        sink = self.sink
        sink.in_flight += 1
        sink.max_in_flight = max(sink.max_in_flight, sink.in_flight)
        try:
            recorded = Recorded(self.request.path, dict(self.request.headers.get_all()), self.request.body,
                                self.request.connection.context.address[1])  # type: ignore[union-attr]
            sink.requests.append(recorded)
            answer = sink.answers(recorded)
            if answer.delay:
                assert sink.released is not None
                try:
                    await asyncio.wait_for(sink.released.wait(), answer.delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            sink.in_flight -= 1
        self.set_status(answer.status)
        for name, value in answer.headers.items():
            self.set_header(name, value)
        self.finish(answer.body)


class HttpSink:
    """Serve until :meth:`stop`; ``url`` is the base URL, any POST path is recorded.

    ``port`` 0 (the default) lets the kernel pick; a test that first needs nothing listening
    on a URL and later a sink there passes that URL's port."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[Recorded] = []
        self.answers: Callable[[Recorded], Answer] = lambda _: Answer()
        self.in_flight = 0
        self.max_in_flight = 0
        self.released: asyncio.Event | None = None
        sockets = bind_sockets(port, "127.0.0.1")
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop, self.released = asyncio.Event(), asyncio.Event()
            server = HTTPServer(Application([(r"/.*", SinkHandler, {"sink": self})]))
            server.add_sockets(sockets)
            ready.set()
            await self._stop.wait()
            server.stop()
            self.released.set()
            await asyncio.sleep(0.05)  # let held answers finish before the connections go
            await server.close_all_connections()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "sink did not start"

    def bodies(self) -> list[Any]:
        return [request.json() for request in self.requests]

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            assert not self._thread.is_alive(), "sink did not stop"


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
