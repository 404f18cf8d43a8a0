"""A small keep-alive HTTP/1.1 client on asyncio protocols, for the HTTP destinations.

It does what a webhook needs and no more: POST a body with a ``Content-Length`` to one origin
over a pool of persistent connections (TLS through asyncio's ``ssl``), and read the answer,
whether its length comes from ``Content-Length``, chunked transfer coding or the connection
closing. A general client (httpx) costs 1-3 ms of CPU per request in pool bookkeeping; this
one is a buffer, a parser and a timer per request.

Failures are :class:`HttpError` subclasses: :class:`ConnectError` (no connection),
:class:`RemoteProtocolError` (closed without a full answer, or an answer that is not HTTP),
and the timeouts :class:`ConnectTimeout` and :class:`ReadTimeout`, which are also
:class:`TimeoutError`. A request sent on a pooled connection that the server closed without
answering a byte (it timed the idle connection out as we wrote) goes once more on a fresh one.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
NO_BODY_STATUSES = frozenset({204, 304})
DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpError(Exception):
    """No usable answer came."""


class ConnectError(HttpError):
    pass


class RemoteProtocolError(HttpError):
    pass


class HttpTimeout(HttpError, TimeoutError):
    pass


class ConnectTimeout(HttpTimeout):
    pass


class ReadTimeout(HttpTimeout):
    """No complete answer within the timeout after the request was written."""


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class _Closed(RemoteProtocolError):
    """The connection closed before any byte of the answer: the request may be sent again."""


_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE, _DONE = range(7)


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time: write a request, parse its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self._waiter: asyncio.Future[Response] | None = None
        self._buffer = bytearray()
        self._state = _DONE
        self._got_bytes = False
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._remaining = 0
        self._keep_alive = True

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():  # nothing asked for: not a conversation
            self.close()
            return
        self._got_bytes = True
        self._buffer += data
        try:
            self._parse()
        except RemoteProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost finishes or fails the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._state == _UNTIL_CLOSE:
            self._keep_alive = False
            self._finish()
        elif not self._got_bytes:
            waiter.set_exception(_Closed("server closed the connection without answering"))
        else:
            waiter.set_exception(RemoteProtocolError("server closed the connection mid-answer"))

    # --- one exchange -------------------------------------------------------------------------

    async def exchange(self, request: bytes, timeout: float) -> Response:
        assert self.transport is not None and self._state == _DONE
        if self.closed or self.transport.is_closing():
            raise _Closed("connection closed before the request was sent")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._buffer.clear()
        self._got_bytes, self._state, self.reusable = False, _HEAD, False
        self.transport.write(request)
        timer = loop.call_later(timeout, self._timed_out)
        try:
            return await waiter
        except asyncio.CancelledError:
            self.close()  # the answer's state is unknown: this connection cannot carry another
            raise
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _timed_out(self) -> None:
        self._fail(ReadTimeout())

    def _fail(self, exc: Exception) -> None:
        self._state = _DONE
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def _finish(self) -> None:
        self._state = _DONE
        content = bytes(self._body)
        self._body.clear()
        encoding = self._headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "deflate", "x-gzip") and content:
            try:
                content = zlib.decompress(content, 47 if encoding != "deflate" else 15)
            except zlib.error as exc:
                self._fail(RemoteProtocolError(f"undecodable {encoding} body: {exc}"))
                return
        leftover = bool(self._buffer)  # bytes after the answer: pipelining we never asked for
        self.reusable = self._keep_alive and not leftover and not self.closed
        if not self.reusable:
            self.close()
        assert self._waiter is not None
        if not self._waiter.done():
            self._waiter.set_result(Response(self._status, self._headers, content))

    # --- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self._buffer
        while self._state != _DONE:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise RemoteProtocolError("answer head too long")
                    return
                head = bytes(buffer[:end])
                del buffer[:end + 4]
                self._start_body(head)
            elif state == _FIXED:
                take = min(self._remaining, len(buffer))
                self._body += buffer[:take]
                del buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return
                self._finish()
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise RemoteProtocolError("chunk size line too long")
                    return
                line = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[:end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise RemoteProtocolError(f"bad chunk size {line[:20]!r}") from None
                if size < 0:
                    raise RemoteProtocolError("bad chunk size")
                self._grow(size)
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_DATA:
                if len(buffer) < self._remaining + 2:
                    return
                if buffer[self._remaining:self._remaining + 2] != b"\r\n":
                    raise RemoteProtocolError("chunk not followed by CRLF")
                self._body += buffer[:self._remaining]
                del buffer[:self._remaining + 2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                if buffer[:2] == b"\r\n":
                    del buffer[:2]
                    self._finish()
                    continue
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise RemoteProtocolError("trailer too long")
                    return
                del buffer[:end + 4]
                self._finish()
            else:  # _UNTIL_CLOSE: everything up to the close is the body
                self._grow(len(buffer))
                self._body += buffer
                buffer.clear()
                return

    def _start_body(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise RemoteProtocolError(f"not an HTTP/1.x answer: {lines[0][:40]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise RemoteProtocolError(f"malformed header line {line[:40]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if 100 <= status < 200:  # informational (100 Continue, 103 Early Hints): the answer follows
            return
        connection = headers.get("connection", "").lower()
        self._keep_alive = ("close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection)
        self._status, self._headers = status, headers
        self._body.clear()
        if status in NO_BODY_STATUSES:
            self._finish()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise RemoteProtocolError("bad Content-Length") from None
            if length < 0:
                raise RemoteProtocolError("bad Content-Length")
            self._grow(length)
            self._remaining, self._state = length, _FIXED
            if not length:
                self._finish()
        else:
            self._keep_alive, self._state = False, _UNTIL_CLOSE

    def _grow(self, more: int) -> None:
        if len(self._body) + more > MAX_BODY_BYTES:
            raise RemoteProtocolError(f"answer body over {MAX_BODY_BYTES} bytes")


class HttpClient:
    """POSTs to one origin (``scheme://host:port``) over up to ``pool_size`` idle keep-alive
    connections. The caller bounds how many requests are in flight at once (the webhook's
    concurrency); a request finds an idle connection or opens one."""

    def __init__(self, scheme: str, host: str, port: int | None, *, timeout: float, pool_size: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.host, self.port = host, port or DEFAULT_PORTS[scheme]
        self.timeout, self.pool_size = timeout, pool_size
        self.ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()

    @property
    def authority(self) -> str:
        """What the ``Host`` header carries."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS["https" if self.ssl else "http"]
        return host if self.port == default else f"{host}:{self.port}"

    async def send(self, request: bytes) -> Response:
        """Send one complete request (head and body) and return its answer."""
        connection, reused = await self._acquire()
        try:
            return await connection.exchange(request, self.timeout)
        except _Closed:
            if not reused:
                raise
        finally:
            self._release(connection)
        connection = await self._connect()  # the server dropped an idle connection: once more
        try:
            return await connection.exchange(request, self.timeout)
        finally:
            self._release(connection)

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()  # the most recently used is the least likely to be stale
            if not connection.closed:
                return connection, True
            self._open.discard(connection)
        return await self._connect(), False

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and len(self._idle) < self.pool_size:
            self._idle.append(connection)
        else:
            connection.close()
            self._open.discard(connection)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        server_hostname = self.host if self.ssl else None
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl,
                                       server_hostname=server_hostname), self.timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout() from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        self._open.add(connection)
        return connection
