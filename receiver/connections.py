"""Connections: how many a process holds, how long an idle or a slow one may stay, and how
long a request's target may be (nginx's ``worker_connections``, ``keepalive_timeout``,
``client_header_timeout`` and its 414).

Tornado's HTTPServer parses and frames each connection; what it leaves open, we close here:

- **Running out of descriptors.** Tornado's accept handler lets ``EMFILE`` escape, and the loop
  calls it again at once because the listening socket is still readable: 99% CPU, a traceback
  per attempt, new clients left waiting. Ours pauses accepting for ``ACCEPT_PAUSE_SECONDS``,
  closes the longest-idle keep-alive connection to free a descriptor, and logs one line a
  second with the number of attempts folded into it. Clients wait in the listen backlog.
- **Too many connections.** Past ``max_connections`` (by default the descriptor limit less
  ``DESCRIPTOR_HEADROOM`` for the database, the log and the wake-up socket), a new connection
  first makes room by closing idle keep-alive connections, longest idle first; if none is idle
  it is answered ``503`` with ``Retry-After`` and closed at once. Near the limit
  (``NEAR_LIMIT``), each new connection closes one idle connection, so the limit is seldom hit.
- **Idle versus slow.** Tornado has one timeout for a connection waiting for its next request
  and a request whose head is arriving slowly, and closes either without an answer. Ours keeps
  them apart: a keep-alive connection with nothing sent is closed after
  ``idle_timeout_seconds`` (a new connection with nothing sent after
  ``header_timeout_seconds``); a request head started but not whole within
  ``header_timeout_seconds`` is answered ``408`` and closed (slowloris). The stream notes the
  moment the first byte of a head arrives; one sweep a second does the rest.
- **Long URLs.** A request target over ``max_url_bytes`` is answered ``414`` before Tornado
  parses its query (pixels included: an ``<img>`` gets no GIF for a URL nobody could have
  meant). A head over ``max_header_bytes`` in all still gets Tornado's close without an answer:
  that is the bound on what one connection can make us buffer before we have judged anything.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders, RequestStartLine, ResponseStartLine
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from pipeline.config import ReceiverConfig
from pipeline.logs import Throttled
from pipeline.messages import Problem
from receiver.answers import JSON, single_error

log = logging.getLogger("trackrelay.receiver")

SWEEP_SECONDS = 1.0
ACCEPT_PAUSE_SECONDS = 0.1
ACCEPTS_PER_WAKEUP = 128  # as Tornado's own accept handler: others get their turn on the loop
# Descriptors kept for everything but client connections: the listening sockets, the
# database's pooled connections (SQLite: the file, its -wal and -shm, per connection), log
# files, the worker's wake-up socket, the standard streams.
DESCRIPTOR_HEADROOM = 64
# From this share of max_connections on, each new connection closes the longest-idle one.
NEAR_LIMIT = 0.9
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

HEAD_TIMED_OUT = Problem("request_timeout", "Request timeout",
                         "the request's headers did not arrive in time", status=408, error="Request Timeout")
CONNECTIONS_FULL = Problem("too_many_connections", "Service unavailable",
                           "the receiver holds as many connections as it may; retry later", status=503,
                           error="Service Unavailable")


def url_too_long(limit: int) -> Problem:
    return Problem("uri_too_long", "URI too long", f"the request target is over {limit} bytes", status=414,
                   error="URI Too Long")


def raw_answer(problem: Problem, retry_after: int = 0) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for the moments before Tornado has a
    request to answer through (a head that never finished, a connection past the limit)."""
    body = orjson.dumps(single_error(problem))
    head = [f"HTTP/1.1 {problem.status} {problem.error}"]
    head += [f"{name}: {value}" for name, value in closing_headers(body, retry_after).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def closing_headers(body: bytes, retry_after: int = 0) -> dict[str, str]:
    """The headers of an error answered here, after which the connection closes."""
    headers = {"Content-Type": JSON, "Content-Length": str(len(body)), "Cache-Control": "no-store",
               "Connection": "close"}
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    return headers


def descriptor_limit() -> int:
    """Raise this process's soft descriptor limit to its hard one (as Go's runtime does: the
    soft 1,024 is for programs that use select(), and Tornado uses epoll); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limit(receiver: ReceiverConfig, descriptors: int) -> int:
    """``max_connections`` if set, else what the descriptor limit leaves after the headroom."""
    if receiver.max_connections:
        return receiver.max_connections
    return max(16, descriptors - DESCRIPTOR_HEADROOM)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float
    idle_timeout: float
    max_url_bytes: int
    retry_after: int

    @classmethod
    def of(cls, receiver: ReceiverConfig, descriptors: int, retry_after: int) -> ConnectionLimits:
        return cls(connection_limit(receiver, descriptors), receiver.header_timeout_seconds,
                   receiver.idle_timeout_seconds, receiver.max_url_bytes, retry_after)


class WatchedStream(IOStream):
    """A client connection that knows whether it waits for a request, and since when the head
    of the next one has been arriving. ``read_from_fd`` is IOStream's documented hook for how
    bytes are read; ours only notes the time of the first byte of a head."""

    def __init__(self, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.waiting_since: float | None = time.monotonic()  # None: a request is being served
        self.head_started: float | None = None
        self.served = 0  # requests whose heads were whole

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        read = super().read_from_fd(buf)
        if read and self.head_started is None and self.waiting_since is not None:
            self.head_started = time.monotonic()
        return read


class _Acceptor:
    """Accepts on one listening socket; pauses instead of spinning when descriptors run out."""

    def __init__(self, sock: socket.socket, server: GuardedHTTPServer) -> None:
        self.sock, self.server = sock, server
        self.loop = IOLoop.current()
        self.resume: asyncio.TimerHandle | None = None
        self.closed = False
        self.loop.add_handler(sock, self._ready, IOLoop.READ)

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self.closed or self.resume is not None:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                self._pause(exc)
                return
            self.server.accepted(connection, address)

    def _pause(self, exc: OSError) -> None:
        self.loop.remove_handler(self.sock)
        self.resume = self.loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume)  # type: ignore[assignment]
        self.server.out_of_descriptors(exc)

    def _resume(self) -> None:
        self.resume = None
        if not self.closed:
            self.loop.add_handler(self.sock, self._ready, IOLoop.READ)

    def close(self) -> None:
        self.closed = True
        if self.resume is not None:
            self.loop.remove_timeout(self.resume)
            self.resume = None
        else:
            self.loop.remove_handler(self.sock)
        self.sock.close()


class _HeadCheck(httputil.HTTPMessageDelegate):
    """Between Tornado's connection and the application: marks the connection busy once a
    head is whole, and answers 414 to a target over the limit before anything parses it."""

    __slots__ = ("inner", "stream", "request_conn", "limit", "refused")

    def __init__(self, inner: httputil.HTTPMessageDelegate, stream: WatchedStream,
                 request_conn: httputil.HTTPConnection, limit: int) -> None:
        self.inner, self.stream, self.request_conn, self.limit = inner, stream, request_conn, limit
        self.refused = False

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,
                         headers: HTTPHeaders) -> Any:
        stream = self.stream
        stream.waiting_since = stream.head_started = None
        stream.served += 1
        assert isinstance(start_line, RequestStartLine)
        if len(start_line.path) > self.limit:
            self.refused = True
            problem = url_too_long(self.limit)
            body = orjson.dumps(single_error(problem))
            self.request_conn.write_headers(ResponseStartLine("HTTP/1.1", problem.status, problem.error),
                                            HTTPHeaders(closing_headers(body)), body)
            self.request_conn.finish()
            return None
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        if not self.refused:
            return self.inner.data_received(chunk)
        return None

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()


class GuardedHTTPServer(HTTPServer):
    """Tornado's HTTPServer with our accept loop, connection limit and head/idle timeouts.

    ``count(code)`` is told of each connection refused or timed out (into the rejected tally).
    """

    def initialize(self, request_callback: Any, *, limits: ConnectionLimits,  # type: ignore[override]
                   count: Callable[[str], None], **kwargs: Any) -> None:
        super().initialize(request_callback, **kwargs)
        self.limits, self.count = limits, count
        self.near_limit = max(1, int(limits.max_connections * NEAR_LIMIT))
        # Connections in the order they last became idle: the front has waited longest.
        self.watched: dict[WatchedStream, None] = {}
        self.acceptors: list[_Acceptor] = []
        self.throttled = Throttled(log)
        self.sweep_task: asyncio.Task[None] | None = None

    # -- accepting ----------------------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        for sock in sockets:
            self.acceptors.append(_Acceptor(sock, self))
        if self.sweep_task is None:
            self.sweep_task = asyncio.ensure_future(self._sweep())

    def stop(self) -> None:
        super().stop()  # nothing of Tornado's own to stop: our acceptors hold the sockets
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors = []
        if self.sweep_task is not None:
            self.sweep_task.cancel()
            self.sweep_task = None

    def accepted(self, connection: socket.socket, address: Any) -> None:
        held = len(self.watched)
        if held >= self.limits.max_connections:
            if self._close_idle(held - self.limits.max_connections + 1) == 0:
                self._refuse_full(connection)
                return
        elif held >= self.near_limit:
            self._close_idle(1)
        try:
            stream = WatchedStream(connection, max_buffer_size=self.max_buffer_size,
                                   read_chunk_size=self.read_chunk_size)
        except OSError:  # gone before we could set it up
            connection.close()
            return
        self.watched[stream] = None
        self.handle_stream(stream, address)

    def out_of_descriptors(self, exc: OSError) -> None:
        freed = self._close_idle(1)
        self.throttled.warning("out_of_descriptors", "event=out_of_descriptors error=%s connections=%d "
                               "closed_idle=%d accepting_again_in=%.1fs", errno.errorcode.get(exc.errno or 0, exc),
                               len(self.watched), freed, ACCEPT_PAUSE_SECONDS)

    def _refuse_full(self, connection: socket.socket) -> None:
        self.count(CONNECTIONS_FULL.code)
        self.throttled.warning("too_many_connections", "event=too_many_connections connections=%d limit=%d",
                               len(self.watched), self.limits.max_connections)
        try:
            connection.setblocking(False)
            connection.send(raw_answer(CONNECTIONS_FULL, self.limits.retry_after))
        except OSError:
            pass
        connection.close()

    def _close_idle(self, wanted: int) -> int:
        """Close up to ``wanted`` keep-alive connections with nothing sent, longest idle first."""
        idle = []
        for stream in self.watched:
            if stream.waiting_since is not None and stream.head_started is None and stream.served:
                idle.append(stream)
                if len(idle) >= wanted:
                    break
        for stream in idle:
            stream.close()
            self.watched.pop(stream, None)
        return len(idle)

    # -- each request on a connection ---------------------------------------------------------

    def start_request(self, server_conn: Any, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream: WatchedStream = server_conn.stream  # every stream is ours: accepted() made it
        stream.waiting_since, stream.head_started = time.monotonic(), None
        if self.watched.pop(stream, 0) is None:  # to the back: it has just become idle
            self.watched[stream] = None
        return _HeadCheck(delegate, stream, request_conn, self.limits.max_url_bytes)

    def on_close(self, server_conn: Any) -> None:
        self.watched.pop(server_conn.stream, None)
        super().on_close(server_conn)

    # -- the sweep ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        limits = self.limits
        for stream in list(self.watched):
            since = stream.waiting_since
            if since is None or stream.closed():
                continue
            if stream.head_started is not None:
                if now - stream.head_started > limits.header_timeout:
                    self._time_out_head(stream)
            elif now - since > (limits.idle_timeout if stream.served else limits.header_timeout):
                # Nothing sent: closed without an answer, as browsers expect of an idle keep-alive
                # (and of a preconnected socket never used).
                stream.close()
                self.watched.pop(stream, None)

    def _time_out_head(self, stream: WatchedStream) -> None:
        stream.waiting_since = None
        self.count(HEAD_TIMED_OUT.code)
        self.throttled.warning("header_timeout", "event=request_timeout part=headers connections=%d",
                               len(self.watched))
        self.watched.pop(stream, None)
        try:
            done = stream.write(raw_answer(HEAD_TIMED_OUT))
        except Exception:  # closed meanwhile
            stream.close()
            return
        done.add_done_callback(lambda _: stream.close())
        # A client that does not read its answer does not keep the connection either.
        IOLoop.current().call_later(SWEEP_SECONDS, stream.close)
