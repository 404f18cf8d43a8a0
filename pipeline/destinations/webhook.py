"""The ``webhook`` destination: POST events as JSON to a URL over pooled keep-alive connections.

``batch_size = 1`` sends each event as the request body; a larger ``batch_size`` sends
``{"batch": [...]}`` (the Segment batch shape) per chunk. At most ``concurrency`` requests are
in flight at once, however many chunks a ``deliver`` call holds: ``concurrency`` sender tasks
take encoded requests from one queue, each sending its next request in the same step that
reads the answer to its last, as a load generator does. (With a semaphore, the next request
waited a turn of the event loop behind every other callback, and the destination idled.)
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import httpx
import orjson

from pipeline.destinations.base import Destination, Event, Outcome, rejected
from pipeline.destinations.http import outcome_for_exception, outcome_for_status
from pipeline.destinations.httpclient import ClientClosed, HttpClient, HttpError, Response, environment_proxy

# A request waiting for a sender, and where its answer (or the error instead) goes.
Pending = tuple[bytes, "asyncio.Future[Response]"]


FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

# What an HTTP/1.1 header can carry (RFC 9110 token; visible ASCII and spaces). Refused at
# start-up: sent, they would fail every request, retried until the events are dead.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class WebhookOptions:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 10.0
    concurrency: int = 8


def user_agent() -> str:
    try:
        return f"trackrelay/{version('trackrelay')}"
    except PackageNotFoundError:
        return "trackrelay"


class WebhookDestination(Destination):
    """POSTs each chunk of ``batch_size`` events; one outcome per chunk, from the HTTP answer.

    Other HTTP adapters subclass it and change what a chunk's request looks like
    (:meth:`endpoint`, :meth:`client_headers`, :meth:`encode`) and how its answer is read
    (:meth:`outcomes`); the pool, the concurrency limit and the failure handling stay here.
    """

    Options = WebhookOptions
    default_batch_size = 1

    @property
    def parallelism(self) -> int:
        return self.options.concurrency

    def __init__(self, name: str, options: WebhookOptions, batch_size: int) -> None:
        super().__init__(name, options, batch_size)
        if batch_size < 1 or options.concurrency < 1 or options.timeout_seconds <= 0:
            raise ValueError(f"destination {name!r}: batch_size and concurrency must be at least 1 "
                             "and timeout_seconds above 0")
        try:
            url = httpx.URL(self.endpoint())
        except httpx.InvalidURL as exc:
            raise ValueError(f"destination {name!r}: invalid url {options.url!r} ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"destination {name!r}: url must be an http:// or https:// URL, got {options.url!r}")
        for header, value in self.client_headers().items():
            if not HEADER_NAME.fullmatch(header) or not HEADER_VALUE.fullmatch(value):
                raise ValueError(f"destination {name!r}: header {header!r} must be a token with a "
                                 "printable ASCII value")
            if header.lower() in FRAMING_HEADERS:
                # The client frames each request itself; a second framing header would corrupt it.
                raise ValueError(f"destination {name!r}: header {header!r} is set by trackrelay and "
                                 "cannot be configured")
        self._url = url
        self._client: HttpClient | None = None
        self._head = b""
        self._pending: asyncio.Queue[Pending] | None = None
        self._senders: list[asyncio.Task[None]] = []

    def endpoint(self) -> str:
        return self.options.url

    def client_headers(self) -> dict[str, str]:
        """Headers sent with every request, over the defaults (Content-Type, User-Agent)."""
        return dict(self.options.headers)

    async def encode(self, chunk: Sequence[Event]) -> tuple[bytes, dict[str, str]]:
        """The body of one chunk's request, and headers of its own."""
        body = chunk[0] if self.batch_size == 1 else {"batch": list(chunk)}
        return orjson.dumps(body), {}

    def outcomes(self, chunk: Sequence[Event], response: Response) -> list[Outcome]:
        """One outcome per event of ``chunk`` from the answer to its request."""
        outcome = outcome_for_status(response.status_code, response.headers, response.text)
        return [outcome] * len(chunk)

    async def start(self) -> None:
        concurrency, url = self.options.concurrency, self._url
        host = url.raw_host.decode("ascii")
        self._client = HttpClient(url.scheme, host, url.port, timeout=self.options.timeout_seconds,
                                  pool_size=concurrency, proxy=environment_proxy(url.scheme, host, url.port))
        headers = {"host": ("Host", self._client.authority),
                   "content-type": ("Content-Type", "application/json"),
                   "user-agent": ("User-Agent", user_agent())}
        if url.userinfo:  # http://user:password@host/: Basic auth, as httpx did
            token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode("ascii")
            headers["authorization"] = ("Authorization", f"Basic {token}")
        headers.update({name.lower(): (name, value) for name, value in self.client_headers().items()})
        lines = self._client.request_start(b"POST", url.raw_path)  # absolute-form to a plain-HTTP proxy
        lines += [f"{name}: {value}".encode("ascii") for name, value in headers.values()]
        self._head = b"\r\n".join(lines) + b"\r\n"  # each request adds its own headers and the length
        self._pending = asyncio.Queue()
        self._senders = [asyncio.create_task(self._sender(self._client, self._pending), name=f"{self.name}-sender")
                         for _ in range(concurrency)]

    async def close(self) -> None:
        senders, self._senders = self._senders, []
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        pending, self._pending = self._pending, None
        while pending is not None and not pending.empty():
            _, answer = pending.get_nowait()
            if not answer.done():
                answer.set_exception(ClientClosed("the destination was closed before this request was sent"))
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @staticmethod
    async def _sender(client: HttpClient, pending: asyncio.Queue[Pending]) -> None:
        while True:
            request, answer = await pending.get()  # no wait while requests are queued
            if answer.done():
                continue  # its caller was cancelled while it waited
            try:
                response = await client.send(request)
            except Exception as exc:  # HttpError, or a bug of ours: the caller's to handle, not ours to die of
                if not answer.done():
                    answer.set_exception(exc)
            except asyncio.CancelledError:
                if not answer.done():
                    answer.set_exception(ClientClosed("the destination was closed during this request"))
                raise
            else:
                if not answer.done():
                    answer.set_result(response)

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        size = self.batch_size
        if 0 < len(events) <= size:  # one request: no gather, whose tasks cost more than the request
            return await self._send(events)
        chunks = [events[i:i + size] for i in range(0, len(events), size)]
        answers = await asyncio.gather(*(self._send(chunk) for chunk in chunks))
        return [outcome for answer in answers for outcome in answer]

    async def _send(self, chunk: Sequence[Event]) -> list[Outcome]:
        if self._client is None or self._pending is None:
            raise RuntimeError(f"destination {self.name!r} is not started")
        try:
            content, headers = await self.encode(chunk)
        except TypeError as exc:  # orjson.JSONEncodeError: not JSON, and never will be
            return [rejected(f"cannot encode as JSON: {exc}")] * len(chunk)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("ascii")
        request = b"%s%sContent-Length: %d\r\n\r\n%s" % (self._head, extra, len(content), content)
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        if self._pending is None:  # closed while encoding
            return [outcome_for_exception(ClientClosed("the destination was closed"))] * len(chunk)
        self._pending.put_nowait((request, answer))
        try:
            response = await answer
        except HttpError as exc:
            return [outcome_for_exception(exc)] * len(chunk)
        return self.outcomes(chunk, response)
