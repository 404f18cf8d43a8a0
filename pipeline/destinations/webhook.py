"""The ``webhook`` destination: POST events as JSON to a URL over pooled keep-alive connections.

``batch_size = 1`` sends each event as the request body; a larger ``batch_size`` sends
``{"batch": [...]}`` (the Segment batch shape) per chunk.

How many requests are in flight at once is the destination's ``concurrency``: a number fixes
it; ``"adaptive"`` (the default) lets an AIMD controller find it, up to ``max_concurrency``
(pipeline/destinations/concurrency.py). Sender tasks, as many as the limit, take encoded
requests from one queue, each sending its next request in the same step that reads the answer
to its last, as a load generator does. (With a semaphore, the next request waited a turn of
the event loop behind every other callback, and the destination idled.) When the limit grows,
senders are added; when it is cut, senders end as they finish a request.

An answer with ``Retry-After`` (a ``429`` or ``503`` saying how long to wait) pauses the whole
destination: until then nothing more is sent, and :meth:`pause_seconds` tells the claim side
to claim nothing either.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Sequence
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import httpx
import orjson

from pipeline.destinations.base import Destination, Event, Outcome, inherits, rejected, retry
from pipeline.destinations.concurrency import (ADAPTIVE, DEFAULT_MAX_CONCURRENCY, Concurrency, Snapshot,
                                               check_concurrency, controller_for)
from pipeline.destinations.http import (header_value, is_retryable_status, outcome_for_exception, outcome_for_status,
                                        retry_after_seconds)
from pipeline.destinations.httpclient import (ClientClosed, ConnectError, HttpClient, HttpError, HttpTimeout,
                                              RemoteProtocolError, Response, environment_proxy)

# A request waiting for a sender, and where its answer (or the error instead) goes.
Pending = tuple[bytes, "asyncio.Future[Response]"]


# Answers whose Retry-After pauses the whole destination ("too many requests", "unavailable").
PAUSE_STATUSES = frozenset({429, 503})

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
    # "adaptive" or a fixed number of requests in flight (pipeline/destinations/concurrency.py).
    concurrency: int | str = ADAPTIVE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY


def is_push_back(exc: Exception) -> bool:
    """A failure that says the destination (or the way to it) is overloaded: a timeout, a
    refused or reset connection, a connection closed without an answer."""
    return isinstance(exc, (HttpTimeout, ConnectError, RemoteProtocolError))


# Answers that say "slow down" whenever they come: the destination, or a gateway in front of
# it, is overloaded or cannot reach it.
OVERLOAD_STATUSES = frozenset({408, 429, 502, 503, 504})


def is_push_back_status(status: int, after_failure: bool) -> bool:
    """Whether an answer cuts the adaptive limit: an overload status always; any other answer
    that is retried (``500``, ``5xx`` but ``501`` and ``505``) when the answer before it was a
    retried failure too. Vector's adaptive concurrency counts every retryable answer; but a
    lone ``500`` is often one bad event's, and with 1% of answers ``500`` the limit would
    settle near 30. A destination answering ``500`` to everything is down, though: left at
    its limit, each of its answers, as quick as a healthy one's, cost the worker a claim and
    a record as a delivery does, and the healthy destinations got 0.88 of their rate on
    Postgres (bench R10)."""
    return status in OVERLOAD_STATUSES or (after_failure and is_retryable_status(status))


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
        """Requests in flight now allowed: the claim side keeps that many requests' worth of
        events in hand (pipeline/delivery.py), following an adaptive limit as it moves."""
        return self.controller.limit

    @property
    def max_parallelism(self) -> int:
        return self.controller.max_concurrency

    def __init__(self, name: str, options: WebhookOptions, batch_size: int) -> None:
        super().__init__(name, options, batch_size)
        if batch_size < 1 or options.timeout_seconds <= 0:
            raise ValueError(f"destination {name!r}: batch_size must be at least 1 and timeout_seconds above 0")
        problem = check_concurrency(options.concurrency, options.max_concurrency)
        if problem:
            raise ValueError(f"destination {name!r}: {problem}")
        self.controller: Concurrency = controller_for(options.concurrency, options.max_concurrency)
        # Monotonic time until which the destination asked us (Retry-After) to send nothing.
        self._resume_at = 0.0
        # Whether the last answer to come (any sender's) was a failure to retry.
        self._last_failed = False
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
        self._senders: set[asyncio.Task[None]] = set()

    @property
    def takes_stored_json(self) -> bool:
        # Only this class's own methods pass each event on as it is; a subclass that changes
        # how a chunk is sent or read (segment adds sentAt to each) may read the events.
        return inherits(self, WebhookDestination, "deliver", "_send", "encode", "outcomes")

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
        concurrency, url = self.controller.max_concurrency, self._url
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
        self._add_senders()

    async def close(self) -> None:
        senders, self._senders = list(self._senders), set()
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

    def concurrency_snapshot(self) -> Snapshot:
        return self.controller.snapshot()

    def pause_seconds(self) -> float:
        return max(0.0, self._resume_at - time.monotonic())

    def _add_senders(self) -> None:
        """As many sender tasks as the limit allows (a cut retires them as they finish)."""
        while len(self._senders) < self.controller.limit and self._pending is not None:
            self._senders.add(asyncio.create_task(self._sender(), name=f"{self.name}-sender"))

    async def _sender(self) -> None:
        task = asyncio.current_task()
        client, pending, controller = self._client, self._pending, self.controller
        assert client is not None and pending is not None and task is not None
        try:
            while len(self._senders) <= controller.limit:
                request, answer = await pending.get()  # no wait while requests are queued
                if answer.done():
                    continue  # its caller was cancelled while it waited
                controller.started()
                sent = time.monotonic()
                try:
                    response = await client.send(request)
                except Exception as exc:  # HttpError, or a bug of ours: the caller's to handle, not ours to die of
                    controller.finished(time.monotonic() - sent, pushed_back=is_push_back(exc))
                    self._last_failed = True
                    if not answer.done():
                        answer.set_exception(exc)
                except asyncio.CancelledError:
                    controller.finished(time.monotonic() - sent, pushed_back=False)
                    if not answer.done():
                        answer.set_exception(ClientClosed("the destination was closed during this request"))
                    raise
                else:
                    now = time.monotonic()
                    status = response.status_code
                    controller.finished(now - sent, pushed_back=is_push_back_status(status, self._last_failed))
                    self._last_failed = is_retryable_status(status)
                    if response.status_code in PAUSE_STATUSES:
                        wait = retry_after_seconds(header_value(response.headers, "Retry-After"))
                        if wait:
                            self._resume_at = max(self._resume_at, now + wait)
                    if not answer.done():
                        answer.set_result(response)
                if len(self._senders) < controller.limit:
                    self._add_senders()
        finally:
            self._senders.discard(task)

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
        paused = self.pause_seconds() if self._resume_at else 0.0  # no clock read unless ever paused
        if paused:
            # Not sent: the destination asked for a pause; these go again once it is over.
            return [retry(f"not sent: the destination asked to wait {paused:.1f} s more (Retry-After)",
                          paused)] * len(chunk)
        self._pending.put_nowait((request, answer))
        try:
            response = await answer
        except HttpError as exc:
            return [outcome_for_exception(exc)] * len(chunk)
        return self.outcomes(chunk, response)
