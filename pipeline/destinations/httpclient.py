"""A small keep-alive HTTP/1.1 client on asyncio protocols, for the HTTP destinations.

It does what a webhook needs and no more: POST a body with a ``Content-Length`` to one origin
over a pool of persistent connections (TLS through asyncio's ``ssl``), directly or through an
HTTP proxy, and read the answer, whether its length comes from ``Content-Length``, chunked
transfer coding or the connection closing. A general client (httpx) costs 1-3 ms of CPU per
request in pool bookkeeping; this one is a buffer, a parser and a timer per request.

Why not aiohttp (C parser, pooling, proxies and TLS built in): ``bench/http_clients.py`` drives
the real webhook destination with each, alternating runs, the client on one CPU and the sink
on the other. 2026-12-03, a 2-CPU AMD EPYC VM shared with other work (rates swung 2x from
run to run; CPU per request held), Python 3.11, uvloop, aiohttp 3.14.5; medians of 5 runs,
events/s and the client process's CPU (user + system) per request:

    condition                                    ours                 aiohttp
    R5      Tornado sink, answers at once, 8     3,940/s  56 us       2,810/s  147 us (2.6x)
    R5-raw  bare asyncio sink, at once, 8       13,827/s  27 us       4,445/s  100 us (3.8x)
    R8      Tornado sink, 50 ms answers, 64      1,150/s  56 us       1,018/s  179 us (3.2x)

Where the sink sets the rate (R8, and R5 in an earlier run of 3) aiohttp's events/s was
within 10% of ours, but never its CPU, and the worker's CPU is what its delivery rate runs out
of: it decodes, claims and acknowledges on the same core. So this client stays.

Proxies: :func:`environment_proxy` chooses one per destination when it starts, from
``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` as :mod:`urllib.request` reads them (either case),
and logs the choice without credentials. Through a proxy, an ``http://`` origin's requests go
to the proxy in absolute form (``POST http://host:port/path``, from :meth:`HttpClient.request_start`)
with ``Proxy-Authorization``; an ``https://`` origin's connections open with ``CONNECT`` and
then TLS to the origin over the tunnel, verified as a direct connection is. A proxy that is
down, refuses the CONNECT, or answers 407 is a :class:`ConnectError` naming the proxy (never
its credentials), which the destination retries.

Failures are :class:`HttpError` subclasses: :class:`ConnectError` (no connection),
:class:`RemoteProtocolError` (closed without a full answer, or an answer that is not HTTP),
:class:`ClientClosed` (a request after :meth:`HttpClient.aclose`), and the timeouts
:class:`ConnectTimeout` and :class:`ReadTimeout`, which are also :class:`TimeoutError`. A request
sent on a pooled connection that the server closed without answering a byte (it timed the idle
connection out as we wrote) goes once more on a fresh one.

A body is not a failure, whatever it holds: once the status line has come, the destination has
acted on the request, and an error here would send the events again. A body over
``MAX_BODY_BYTES`` (on the wire or inflated) is cut there, and one whose gzip or deflate coding
breaks off keeps what inflated before; either way :attr:`Response.truncated` says so.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import urllib.parse
import urllib.request
import zlib
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("trackrelay.destinations.http")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
NO_BODY_STATUSES = frozenset({204, 304})
DEFAULT_PORTS = {"http": 80, "https": 443}

# The empty line that ends a head or a trailer section. RFC 9112 2.2 lets a recipient take a bare
# LF for CRLF in start-lines and fields, and h11 (httpx, which this client replaced) does.
END_OF_FIELDS = re.compile(rb"(?:^|\n)\r?\n")
# Strict numbers: int() would also take "+5", "1_0" or (base 16) "0x1a", which are not HTTP.
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class HttpError(Exception):
    """No usable answer came."""


class ConnectError(HttpError):
    pass


class ClientClosed(HttpError):
    """The client was closed: it opens no more connections."""


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
    content: bytes  # without its gzip or deflate content coding
    truncated: bool = False  # content is only the start of the body (see the module docstring)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class ConnectionClosed(RemoteProtocolError):
    """The connection closed before any byte of the answer: the request may be sent again."""


_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


def _inflated(raw: bytes, encoding: str) -> tuple[bytes, bool]:
    """The body without its content coding, at most ``MAX_BODY_BYTES`` of it, and whether that
    is all of it. A coding we do not know leaves the body as it came."""
    encoding = encoding.strip().lower()
    if encoding not in ("gzip", "x-gzip", "deflate") or not raw:
        return raw, True
    inflater = zlib.decompressobj(47 if encoding != "deflate" else 15)  # 47: gzip or zlib header
    try:
        content = inflater.decompress(raw, MAX_BODY_BYTES)  # ~1000:1 is possible: never unbounded
        if not inflater.eof and inflater.unconsumed_tail:  # full: is there more than the limit?
            return content, not inflater.decompress(inflater.unconsumed_tail, 1) and inflater.eof
    except zlib.error:
        return b"", False
    return content, inflater.eof


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
            waiter.set_exception(ConnectionClosed("server closed the connection without answering"))
        else:
            waiter.set_exception(RemoteProtocolError("server closed the connection mid-answer"))

    # --- one exchange -------------------------------------------------------------------------

    async def exchange(self, request: bytes, timeout: float) -> Response:
        assert self.transport is not None and self._state == _DONE
        if self.closed or self.transport.is_closing():
            raise ConnectionClosed("connection closed before the request was sent")
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

    def _finish(self, cut: bool = False) -> None:
        """Answer the exchange; ``cut``: the body went past the limit and the rest is unread."""
        self._state = _DONE
        content, whole = _inflated(bytes(self._body), self._headers.get("content-encoding", ""))
        self._body.clear()
        leftover = bool(self._buffer)  # bytes after the answer: pipelining we never asked for
        self.reusable = self._keep_alive and not cut and not leftover and not self.closed
        if not self.reusable:
            self.close()
        assert self._waiter is not None
        if not self._waiter.done():
            self._waiter.set_result(Response(self._status, self._headers, content, cut or not whole))

    # --- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self._buffer
        while self._state != _DONE:
            state = self._state
            if state == _HEAD:
                lines = self._fields("answer head")
                if lines is None:
                    return
                self._start_body(lines)
            elif state in (_FIXED, _CHUNK_DATA):
                take = min(self._remaining, len(buffer))
                if not self._keep(take):
                    return
                self._remaining -= take
                if self._remaining:
                    return
                if state == _FIXED:
                    self._finish()
                else:
                    self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise RemoteProtocolError("chunk size line too long")
                    return
                line = bytes(buffer[:end])
                del buffer[:end + 2]
                digits = line.split(b";", 1)[0].rstrip(b" \t")  # whitespace may precede an extension
                if not CHUNK_SIZE.fullmatch(digits):
                    raise RemoteProtocolError(f"bad chunk size {line[:20]!r}")
                self._remaining = int(digits, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILER
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise RemoteProtocolError("chunk not followed by CRLF")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                if self._fields("trailer") is None:  # trailer fields are read and dropped
                    return
                self._finish()
            else:  # _UNTIL_CLOSE: everything up to the close is the body
                self._keep(len(buffer))
                return

    def _fields(self, what: str) -> list[bytes] | None:
        """The lines up to the next empty line, cut from the buffer; None until it has come."""
        buffer = self._buffer
        end = END_OF_FIELDS.search(buffer, 0, MAX_HEAD_BYTES)
        if end is None:
            if len(buffer) >= MAX_HEAD_BYTES:
                raise RemoteProtocolError(f"{what} too long")
            return None
        lines = bytes(buffer[:end.start()]).split(b"\n") if end.start() else []
        del buffer[:end.end()]
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]

    def _start_body(self, lines: list[bytes]) -> None:
        status_line = lines[0] if lines else b""
        version, _, rest = status_line.partition(b" ")
        code = rest.partition(b" ")[0]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise RemoteProtocolError(f"not an HTTP/1.x answer: {status_line[:40]!r}")
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
        elif "transfer-encoding" in headers:
            # RFC 9112 6.3: the transfer coding wins over a Content-Length, and an answer with
            # both may be response splitting: its connection carries no other answer.
            self._keep_alive = self._keep_alive and "content-length" not in headers
            if headers["transfer-encoding"].rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state = _CHUNK_SIZE
            else:  # not chunked last: the body ends at the close
                self._keep_alive, self._state = False, _UNTIL_CLOSE
        elif "content-length" in headers:
            self._remaining, self._state = _content_length(headers["content-length"]), _FIXED
            if not self._remaining:
                self._finish()
        else:
            self._keep_alive, self._state = False, _UNTIL_CLOSE

    def _keep(self, count: int) -> bool:
        """Move ``count`` body bytes from the buffer to the body, up to ``MAX_BODY_BYTES``. Past
        it, answer with what is kept and close the connection (False): the status has come, and
        reading on could end in a timeout and the request sent again."""
        room = MAX_BODY_BYTES - len(self._body)
        self._body += self._buffer[:min(count, room)]
        del self._buffer[:count]
        if count > room:
            self._finish(cut=True)
            return False
        return True


@dataclass(frozen=True)
class Proxy:
    """An HTTP forward proxy: ``url`` is its address without credentials (for messages and
    logs), ``authorization`` the ``Proxy-Authorization`` value its user:password make, if any."""

    host: str
    port: int
    url: str
    authorization: str | None = None

    @classmethod
    def from_url(cls, value: str) -> Proxy:
        """A proxy from ``http://[user:password@]host[:port]`` (no scheme means http, as curl
        and urllib take it). Raises ValueError, naming the proxy without its credentials."""
        parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
        try:
            host, port = parts.hostname, parts.port or DEFAULT_PORTS["http"]
        except ValueError:
            host = port = None
        shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        if parts.scheme != "http" or not host:
            raise ValueError(f"proxy {shown}: only http:// proxies (host and optional port) are supported")
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        bracketed = f"[{host}]" if ":" in host else host
        return cls(host, port, f"http://{bracketed}:{port}", authorization)


def environment_proxy(scheme: str, host: str, port: int | None = None) -> Proxy | None:
    """The proxy the environment names for requests to ``scheme://host:port``: ``HTTPS_PROXY``
    or ``HTTP_PROXY`` (either case; lower case wins) unless ``NO_PROXY`` lists the host, as
    :mod:`urllib.request` reads them. Logs the choice; called once per destination at start."""
    proxies = urllib.request.getproxies_environment()
    if scheme not in proxies:
        return None
    address = host if ":" in host else f"{host}:{port or DEFAULT_PORTS[scheme]}"  # NO_PROXY may name a port
    if urllib.request.proxy_bypass_environment(address, proxies):
        log.info("event=proxy_bypassed origin=%s://%s detail='listed in NO_PROXY: connecting directly'",
                 scheme, address)
        return None
    proxy = Proxy.from_url(proxies[scheme])
    log.info("event=proxy origin=%s://%s proxy=%s tunnel=%s auth=%s", scheme, address, proxy.url,
             "CONNECT" if scheme == "https" else "no", "basic" if proxy.authorization else "none")
    return proxy


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until it has answered our CONNECT; TLS to the destination then
    runs over it (with a :class:`_Connection` as its protocol)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._extra = False  # bytes after the answer's head: nothing a tunnel may carry yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._answer.done():
            self._extra = True
            return
        self._buffer += data
        end = END_OF_FIELDS.search(self._buffer, 0, MAX_HEAD_BYTES)
        if end is not None or len(self._buffer) >= MAX_HEAD_BYTES:
            self._answer.set_result(bytes(self._buffer[:end.start()] if end else b""))
            self._extra = end is None or len(self._buffer) > end.end()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._answer.done():
            self._answer.set_exception(ConnectionError("closed the connection"))

    async def open(self, request: bytes, proxy: str, target: str) -> None:
        """Send the CONNECT request for ``target``. Raises ConnectError, naming ``proxy``,
        unless it is answered 2xx (a 407, 403 or 502 is a proxy setting to fix, then retried)."""
        assert self.transport is not None
        self.transport.write(request)
        try:
            head = await self._answer
        except ConnectionError as exc:
            raise ConnectError(f"{proxy} {exc} before answering CONNECT {target}") from None
        status_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or rest[:1] != "2":
            raise ConnectError(f"{proxy} refused CONNECT {target}: {status_line[:80] or 'no answer'}")
        if self._extra:
            raise ConnectError(f"{proxy} sent bytes after its answer to CONNECT {target}, before TLS")


def _content_length(value: str) -> int:
    """The length a Content-Length gives. Copies of one value ("10, 10", or the header repeated)
    are one length (RFC 9112 6.3); anything else but digits is not HTTP."""
    lengths = {length.strip() for length in value.split(",")}
    if len(lengths) != 1 or not CONTENT_LENGTH.fullmatch(next(iter(lengths))):
        raise RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
    return int(lengths.pop())


class HttpClient:
    """POSTs to one origin (``scheme://host:port``) over up to ``pool_size`` idle keep-alive
    connections, directly or through ``proxy``. The caller bounds how many requests are in
    flight at once (the webhook's concurrency); a request finds an idle connection or opens one.
    Each request starts with :meth:`request_start`, which knows whether a proxy is in between."""

    def __init__(self, scheme: str, host: str, port: int | None, *, timeout: float, pool_size: int,
                 ssl_context: ssl.SSLContext | None = None, proxy: Proxy | None = None) -> None:
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.host, self.port = host, port or DEFAULT_PORTS[scheme]
        self.timeout, self.pool_size = timeout, pool_size
        self.proxy = proxy
        self.ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._closed = False

    @property
    def authority(self) -> str:
        """What the ``Host`` header carries."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS["https" if self.ssl else "http"]
        return host if self.port == default else f"{host}:{self.port}"

    def request_start(self, method: bytes, target: bytes) -> list[bytes]:
        """The request line for ``target`` (``/path?query``) and the fields a proxy in between
        needs: a plain-HTTP proxy gets the absolute form and our Proxy-Authorization; through a
        CONNECT tunnel the destination gets the request as it would directly."""
        if self.proxy is None or self.ssl:
            return [b"%s %s HTTP/1.1" % (method, target)]
        lines = [b"%s http://%s%s HTTP/1.1" % (method, self.authority.encode("ascii"), target)]
        if self.proxy.authorization:
            lines.append(b"Proxy-Authorization: " + self.proxy.authorization.encode("ascii"))
        return lines

    async def send(self, request: bytes) -> Response:
        """Send one complete request (head and body) and return its answer.

        Raises:
            ClientClosed: after :meth:`aclose`, or when it cut this request off.
        """
        try:
            response = await self._send(request)
        except HttpError as exc:
            if self._closed and not isinstance(exc, ClientClosed):  # we closed it, not the server
                raise ClientClosed("HTTP client closed during the request") from exc
            raise
        if response.status_code == 407 and self.proxy is not None and not self.ssl:
            # The proxy's answer, not the destination's: nothing was delivered, and a 4xx would
            # reject the events for good over a proxy setting that can be fixed.
            raise ConnectError(f"proxy {self.proxy.url} answered HTTP 407 (proxy authentication required)")
        return response

    async def _send(self, request: bytes) -> Response:
        connection, reused = await self._acquire()
        try:
            return await connection.exchange(request, self.timeout)
        except ConnectionClosed:
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
        """Close every connection; a request after this raises :class:`ClientClosed`."""
        self._closed = True
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
        if (connection.reusable and not connection.closed and not self._closed
                and len(self._idle) < self.pool_size):
            self._idle.append(connection)
        else:
            connection.close()
            self._open.discard(connection)

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ClientClosed("HTTP client closed: no new connections")
        try:
            connection = await asyncio.wait_for(self._open_connection(), self.timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"through proxy {self.proxy.url}" if self.proxy else "") from None
        except (OSError, ssl.SSLError) as exc:
            detail = str(exc) or type(exc).__name__
            raise ConnectError(f"{detail} (through proxy {self.proxy.url})" if self.proxy else detail) from exc
        if self._closed:  # closed while this connection was being opened
            connection.close()
            raise ClientClosed("HTTP client closed: no new connections")
        self._open.add(connection)
        return connection

    async def _open_connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        if proxy is None:
            _, connection = await loop.create_connection(
                _Connection, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None)
            return connection
        try:
            transport, to_proxy = await loop.create_connection(
                _Connection if self.ssl is None else _Tunnel, proxy.host, proxy.port)
        except OSError as exc:
            raise ConnectError(f"proxy {proxy.url} unreachable: {exc or type(exc).__name__}") from exc
        if isinstance(to_proxy, _Connection):  # plain HTTP: the proxy forwards each request
            return to_proxy
        try:
            target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            fields = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
            if proxy.authorization:
                fields.append(f"Proxy-Authorization: {proxy.authorization}")
            await to_proxy.open(("\r\n".join(fields) + "\r\n\r\n").encode("ascii"), f"proxy {proxy.url}", target)
            connection = _Connection()
            # The same verification as a direct connection: our context, the destination's name.
            tls = await loop.start_tls(transport, connection, self.ssl, server_hostname=self.host)
        except BaseException:
            transport.abort()
            raise
        connection.connection_made(tls)
        return connection
