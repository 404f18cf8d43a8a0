"""``bench.sink``'s asyncio engine: a minimal HTTP/1.1 server on ``asyncio.Protocol``.

Tornado spends ~150 us of CPU on a request, so one core answers a few thousand a second; a
destination with 50 ms of latency must take tens of thousands a second with a thousand or
more in flight. Here a request costs a header split, a ``Content-Length`` and a timer
(``loop.call_later``: no task per request). It reads only what the bench's clients send:
``Content-Length`` bodies (no chunked uploads), answered in order on each connection.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import signal
import time
from collections import deque
from http import HTTPStatus

import orjson

from bench.sink import Tally

MAX_HEAD = 65536


def _answer(status: int, body: bytes = b"", content_type: str = "") -> bytes:
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + body


_ANSWERS: dict[int, bytes] = {}


def empty_answer(status: int) -> bytes:
    if status not in _ANSWERS:
        _ANSWERS[status] = _answer(status)
    return _ANSWERS[status]


class Clock:
    """Answers due later, on one timer: a ``call_later`` per request costs a libuv timer each,
    which halved the rate at 1,500 in flight. Due times are kept in a heap, so a latency
    lowered by ``/control`` takes effect at once."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.due: list[tuple[float, int, SinkConnection, Reply, bytes]] = []
        self.order = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def later(self, delay: float, connection: SinkConnection, reply: Reply, data: bytes) -> None:
        at = self.loop.time() + delay
        heapq.heappush(self.due, (at, next(self.order), connection, reply, data))
        if self.timer is None or at < self.timer_at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timer_at = self.loop.call_at(at, self._fire), at

    def _fire(self) -> None:
        self.timer = None
        now = self.loop.time()
        due = self.due
        while due and due[0][0] <= now:
            _, _, connection, reply, data = heapq.heappop(due)
            if reply.admitted:  # not abandoned meanwhile
                connection.ready(reply, data)
        if due:
            self._arm(due[0][0])


class Reply:
    """One request's place in its connection's answer order."""

    __slots__ = ("data", "admitted")

    def __init__(self, admitted: bool) -> None:
        self.data: bytes | None = None
        self.admitted = admitted  # and not answered yet


class SinkConnection(asyncio.Protocol):
    def __init__(self, tally: Tally, clock: Clock) -> None:
        self.tally = tally
        self.clock = clock
        self.buffer = bytearray()
        self.head: tuple[bytes, bytes, bool] | None = None  # method, path, close after answering
        self.length = 0
        self.replies: deque[Reply] = deque()
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            if self.head is None and not self._read_head():
                return
            if len(self.buffer) < self.length:
                return
            body = bytes(self.buffer[:self.length])
            del self.buffer[:self.length]
            method, path, close = self.head  # type: ignore[misc]
            self.head = None
            self._handle(method, path, body, close)

    def _read_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._fail(431)
            return False
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[:end + 4]
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._fail(400)
            return False
        length, close = 0, parts[2] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
            elif name == b"transfer-encoding":
                self._fail(411)
                return False
        self.head, self.length = (parts[0], parts[1], close), length
        return True

    def _fail(self, status: int) -> None:
        assert self.transport is not None
        self.transport.write(empty_answer(status))
        self.transport.close()
        self.transport = None

    def _handle(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        tally = self.tally
        if method == b"GET":
            data = orjson.dumps(tally.arrivals if path == b"/arrivals" else tally.snapshot())
            self._queue(Reply(False), _answer(200, data, "application/json"))
        elif path == b"/control":
            tally.control(orjson.loads(body))
            self._queue(Reply(False), _answer(200, orjson.dumps(tally.snapshot()), "application/json"))
        elif not tally.arrive(body, time.monotonic()):
            self._queue(Reply(False), empty_answer(429))
        else:
            reply = Reply(True)
            self.replies.append(reply)
            if tally.never_answer:
                pass  # answered by nobody: the client's timeout ends it (connection_lost)
            elif tally.latency > 0:
                self.clock.later(tally.latency, self, reply, empty_answer(tally.status))
            else:
                self.ready(reply, empty_answer(tally.status))
        if close and self.transport is not None:
            self.closing = True  # the answers still owed go out, then the connection closes
            self.transport.pause_reading()
            self._flush()

    def _queue(self, reply: Reply, data: bytes) -> None:
        self.replies.append(reply)
        reply.data = data
        self._flush()

    def ready(self, reply: Reply, data: bytes) -> None:
        reply.data = data
        reply.admitted = False
        self.tally.leave(time.monotonic())
        self._flush()

    def _flush(self) -> None:
        while self.replies and self.replies[0].data is not None and self.transport is not None:
            self.transport.write(self.replies.popleft().data)  # type: ignore[arg-type]
        if self.closing and not self.replies and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        now = time.monotonic()
        for reply in self.replies:
            if reply.admitted:  # the clock skips it when it comes due
                reply.admitted = False
                self.tally.leave(now, answered=False)
        self.replies.clear()


async def serve(port: int, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    server = await loop.create_server(lambda: SinkConnection(tally, clock), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def run(port: int, tally: Tally) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, tally))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(port, tally))
