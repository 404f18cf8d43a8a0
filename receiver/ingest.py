"""POSTs that carry events (single messages, batches, webhooks), served by a Tornado message
delegate of our own rather than a ``RequestHandler``.

Why not a RequestHandler: its per-request machinery (the handler object, default headers set
and validated one by one, the output transforms, flush and finish) costs about 100 us of CPU,
a third of what a single-event POST costs in all, and the receiver is CPU-bound. A delegate
sees the same parsed request (Tornado's HTTP/1.1 connection still parses, frames, keeps alive
and answers ``100 Continue``) and writes its answer with one call.

Everything else — OPTIONS preflights and other methods on these paths, pixels, /health,
unknown paths — goes to the Tornado application's handlers, which answer in the same shapes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson
import tornado
from tornado import httputil
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine, ResponseStartLine
from tornado.routing import Router
from tornado.web import Application

from pipeline.envelope import BATCH, SINGLE, WEBHOOK, Refused, Verdict, judge, open_envelope
from pipeline.messages import INVALID_WRITE_KEY, MESSAGE_TYPES, Problem
from pipeline.store import RowRefused, StoreUnavailable
from receiver.answers import (JSON, STORE_REFUSED, STORE_UNAVAILABLE, SUCCESS, SUCCESS_BYTES, batch_error,
                              batch_verdicts, retry_after, single_error)
from receiver.auth import basic_auth_username
from receiver.body import BUFFERS_FULL, TOO_LARGE, BodyError, BodyReader, encoding_problem
from receiver.context import ReceiverContext
from receiver.counts import ACCEPTED, REJECTED
from receiver.recording import commit_request, record_rejected

log = logging.getLogger("trackrelay.receiver")

# Single-message routes and their one-letter aliases.
SHORT = {"identify": "i", "track": "t", "page": "p", "screen": "s", "group": "g", "alias": "a"}

SERVER = f"TornadoServer/{tornado.version}"

# What Tornado's get_query_argument turns into spaces (RequestHandler._remove_control_chars_regex).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0e-\x1f]")

# Compressed bodies may be a little larger than what they inflate to (headers, stored
# blocks); this much slack keeps Content-Length from refusing a body that fits once inflated.
COMPRESSED_SLACK = 1024


class IngestRoute(NamedTuple):
    route: str  # as recorded in outbox.route and rejected.route
    kind: str  # SINGLE, BATCH or WEBHOOK
    route_type: str | None  # the message type a single route implies


def ingest_routes() -> dict[str, IngestRoute]:
    """Every path that takes events, with its aliases."""
    table: dict[str, IngestRoute] = {}
    for kind in MESSAGE_TYPES:
        for name in (kind, SHORT[kind]):
            table[f"/v1/{name}"] = IngestRoute(kind, SINGLE, kind)
    for name in ("batch", "import", "b"):
        table[f"/v1/{name}"] = IngestRoute("batch", BATCH, None)
    for name in ("webhook", "w"):
        table[f"/v1/{name}"] = IngestRoute("webhook", WEBHOOK, None)
    return table


class IngestRouter(Router):
    """POSTs to an ingest path go to :class:`IngestRequest`; everything else to ``app``."""

    def __init__(self, app: Application, ctx: ReceiverContext) -> None:
        self.app, self.ctx = app, ctx
        self.routes = ingest_routes()

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> httputil.HTTPMessageDelegate | None:
        route = self.routes.get(request.path) if request.method == "POST" else None
        if route is None:
            return self.app.find_handler(request, **kwargs)
        return IngestRequest(self.ctx, request, route)


class _Date:
    """The Date header, formatted once a second rather than once a request."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, httputil.format_timestamp(second)
        return cls.value


def declared_length(value: str | None) -> int | None:
    """A Content-Length as Tornado's body reader will take it: copies of one number (a header
    sent twice arrives joined, "10,10") are that number; None for none or not a number."""
    if value is None:
        return None
    lengths = {part.strip() for part in value.split(",")}
    length = lengths.pop() if len(lengths) == 1 else ""
    return int(length) if length.isascii() and length.isdigit() else None


class IngestRequest(httputil.HTTPMessageDelegate):
    """One POST: streamed and limited, judged, committed, answered."""

    def __init__(self, ctx: ReceiverContext, request: HTTPServerRequest, route: IngestRoute) -> None:
        self.ctx, self.request, self.route = ctx, request, route
        receiver = ctx.config.receiver
        self.limit = receiver.max_call_bytes if route.kind == SINGLE else receiver.max_batch_bytes
        self.reader = BodyReader(None, self.limit)
        self.refusal: Problem | None = None
        self.batch_format = route.kind == BATCH
        self.answered = False
        self.task: asyncio.Task[None] | None = None
        # The sources of the request's accepted messages, once judged: whose origin lists
        # the CORS headers follow (None: not known, see receiver/cors.py).
        self.sources: list[str] | None = None
        self.started = 0.0  # when the headers came (time.monotonic): the body's deadline counts from it

    # -- what Tornado's HTTP/1.1 connection calls --------------------------------------------

    def headers_received(self, start_line: RequestStartLine | httputil.ResponseStartLine,
                         headers: HTTPHeaders) -> None:
        self.started = time.monotonic()
        self.ctx.active.add(self)
        connection = self.request.connection
        assert connection is not None
        connection.set_close_callback(self.on_connection_close)
        # Tornado counts a chunk's declared length before we see a byte of it and hands chunked
        # bodies over in 64 KB pieces, so its limit would answer a bare 400 before
        # data_received answers 413. We enforce the discard cap ourselves (the connection
        # closes right after that 413), so Tornado's limit only has to stay out of the way.
        connection.set_max_body_size(2**62)  # type: ignore[attr-defined]
        encoding = headers.get("Content-Encoding")
        self.refusal = encoding_problem(encoding)
        if self.refusal is not None:
            return
        if self.ctx.budget.full():
            self.refuse_busy()
            return
        self.reader = BodyReader(encoding, self.limit, self.ctx.budget)
        declared = declared_length(headers.get("Content-Length"))
        if declared is None:
            return  # chunked (decided while streaming), or a length Tornado's reader answers 400 to
        compressed = (encoding or "identity").strip().lower() != "identity"
        if declared > self.limit + (COMPRESSED_SLACK + self.limit // 100 if compressed else 0):
            self.reader.too_large = True
            # Answer at once when the client waits for "100 Continue" (it then never sends the
            # body) or when the body is past what we would read just to throw away.
            if headers.get("Expect", "").lower() == "100-continue" or \
                    declared > self.ctx.config.receiver.discard_cap_bytes:
                self.refuse_now(TOO_LARGE)

    def data_received(self, chunk: bytes) -> None:
        self.reader.feed(chunk)
        if self.reader.over_budget and not self.answered:
            self.refuse_busy()
        elif self.reader.received > self.ctx.config.receiver.discard_cap_bytes and not self.answered:
            self.refuse_now(TOO_LARGE)  # the connection closes after this answer

    def finish(self) -> None:
        # Tornado calls this only if we have not answered while the body was arriving.
        self.ctx.judging.count += 1  # until _run ends: the group committer waits for us
        self.task = asyncio.ensure_future(self._run())

    # -- what the body sweep calls (receiver/timeouts.py) --------------------------------------

    def body_progress(self) -> tuple[float, int] | None:
        if self.task is not None or self.answered:
            return None  # whole (being judged or committed), or already answered
        return self.started, self.reader.received

    def time_out(self, problem: Problem) -> None:
        if not self.answered:
            self.refuse_counted(problem, "event=request_timeout route=%s received=%d", self.route.route,
                                self.reader.received)

    def rest_if_stalled(self) -> None:
        self.reader.rest_if_stalled()

    def on_connection_close(self) -> None:
        # The client left; a commit already under way still completes.
        self.reader.release()
        if self.task is None:
            self.ctx.active.discard(self)

    # -- the request --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self.post()
        except Exception as exc:  # answer like Tornado would, in our JSON shape
            log.error("event=handler_error path=%s error=%r", self.request.path, str(exc), exc_info=True)
            if not self.answered:
                problem = Problem("http_500", "Internal Server Error", status=500, error="Internal Server Error")
                try:
                    self.answer(500, single_error(problem))
                except Exception:  # nothing can be written: closing is the only answer left
                    log.exception("event=answer_failed path=%s", self.request.path)
                    assert self.request.connection is not None
                    self.request.connection.close()  # type: ignore[attr-defined]
        finally:
            self.ctx.judging.count -= 1
            self.ctx.active.discard(self)

    async def post(self) -> None:
        if self.refusal is not None:
            return await self.refuse(self.refusal, None)
        try:
            body = self.reader.finish()
        except BodyError as exc:
            return await self.refuse(exc.problem, None)
        receiver = self.ctx.config.receiver
        kind = self.route.kind
        auth_key = basic_auth_username(self.request.headers.get("Authorization"))
        try:
            # Only webhooks take ?writeKey= (the spec: it overwrites the incoming data); empty is none.
            override_key = self.query_write_key() if kind == WEBHOOK else None
        except Refused as exc:
            return await self.refuse(exc.problem, None)
        try:
            envelope = open_envelope(body, kind)
        except Refused as exc:
            return await self.refuse(exc.problem, body)
        self.batch_format = envelope.is_batch or kind == BATCH
        if not envelope.is_batch and len(body) > receiver.max_call_bytes:
            return await self.refuse(TOO_LARGE, body)  # one message posted to a batch-sized route
        verdicts = judge(envelope, route_type=self.route.route_type, override_key=override_key,
                         auth_key=auth_key, source_for=self.ctx.sources.source_for,
                         max_message_bytes=receiver.max_message_bytes, body_size=len(body))
        accepted = [v for v in verdicts if v.problem is None]
        if accepted and (self.ctx.guard.active or self.ctx.cors.restricted):
            self.sources = list(dict.fromkeys(v.source or "" for v in accepted))
            if self.ctx.guard.active and await self.guarded(self.sources, body):
                self.ctx.counts.messages_of((v.source for v in verdicts), REJECTED)
                return
        if not self.batch_format:
            if not accepted:
                problem = verdicts[0].problem
                assert problem is not None
                return await self.refuse(problem, body, verdicts=verdicts)
            if await self.commit(body, accepted[0].source or "", auth_key, override_key):
                self.ctx.counts.message(accepted[0].source, ACCEPTED)
                self.answer(200, SUCCESS)
            return
        answer, summary = batch_verdicts(verdicts)
        if not accepted:
            assert summary is not None
            return await self.refuse(summary, body, answer, verdicts)
        if await self.commit(body, accepted[0].source or "", auth_key, override_key):
            # The failed items of a partial success are recorded (and counted) once, by the
            # pipeline, when it decodes this stored request.
            self.ctx.counts.messages_of((v.source for v in accepted), ACCEPTED)
            self.answer(200 if summary is None else receiver.partial_success_status, answer)

    async def guarded(self, sources: list[str], body: bytes) -> bool:
        """Refuse the request (and return True) if its origin or rate is not allowed."""
        route = self.route.route
        refusal = self.ctx.guard.check(self.request.headers.get("Origin"), sources, self.request.remote_ip, route)
        if refusal is None:
            return False
        if refusal.record:
            await record_rejected(self.ctx, self.request, route, refusal.problem, body, refusal.source)
        if refusal.problem.status == 403:
            # No source's list applies to the answer: the page may read it, so its SDK sees a
            # final 4xx rather than a network error to retry (receiver/cors.py).
            self.sources = []
        self.answer(refusal.problem.status, self.error_body(refusal.problem), retry_after_seconds=refusal.retry_after)
        return True

    def query_write_key(self) -> str | None:
        """``?writeKey=``, read as Tornado's ``get_query_argument`` reads it; empty is none."""
        values = self.request.query_arguments.get("writeKey")
        if not values:
            return None
        try:
            value = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            # Never the value: it is (or is meant to be) a write key.
            raise Refused(Problem("invalid_write_key", INVALID_WRITE_KEY,
                                  "the writeKey query parameter is not valid UTF-8")) from None
        return CONTROL_CHARACTERS.sub(" ", value).strip() or None

    async def commit(self, body: bytes, source: str, auth_key: str | None, override_key: str | None) -> bool:
        """Commit the request; answer 503 and return False if the store cannot take it."""
        try:
            await commit_request(self.ctx, self.request, self.route.route, body, source, auth_key, override_key)
        except StoreUnavailable:
            self.answer(503, self.error_body(STORE_UNAVAILABLE))
            return False
        except RowRefused:
            self.answer(STORE_REFUSED.status, self.error_body(STORE_REFUSED))
            return False
        return True

    def error_body(self, problem: Problem) -> dict[str, Any]:
        return batch_error(problem) if self.batch_format else single_error(problem)

    async def refuse(self, problem: Problem, raw: bytes | None, body: dict[str, Any] | None = None,
                     verdicts: Sequence[Verdict] = ()) -> None:
        # Its judged messages, each with its source; else (refused before its messages could
        # be told apart) the request counts as one message of no known source.
        if verdicts:
            self.ctx.counts.messages_of((v.source for v in verdicts), REJECTED)
        else:
            self.ctx.counts.message(None, REJECTED)
        await record_rejected(self.ctx, self.request, self.route.route, problem, raw)
        self.answer(problem.status, body if body is not None else self.error_body(problem))

    def refuse_now(self, problem: Problem) -> None:
        # Answered before the body is read: the connection closes after this answer (Tornado
        # sets that only once the answer is written, too late to say so in it).
        self.answer(problem.status, self.error_body(problem), closing=True)
        self.ctx.counts.message(None, REJECTED)
        self.task = asyncio.ensure_future(record_rejected(self.ctx, self.request, self.route.route, problem, None))
        self.task.add_done_callback(lambda _: self.ctx.active.discard(self))

    def refuse_busy(self) -> None:
        """The process holds max_buffered_bytes of unfinished bodies: 503."""
        self.refuse_counted(BUFFERS_FULL, "event=buffers_full route=%s held=%d cap=%d", self.route.route,
                            self.ctx.budget.held, self.ctx.budget.cap)

    def refuse_counted(self, problem: Problem, line: str, *args: object) -> None:
        """Refuse before the body is whole, the connection closing after the answer: counted into
        the rejected tally and logged at most once a second, not recorded one by one (timeouts
        and full buffers come to many requests at once, and recording takes memory too)."""
        self.reader.release()
        self.ctx.guard.count("", self.route.route, problem.code)
        self.ctx.counts.message(None, REJECTED)
        self.ctx.throttled.warning(problem.code, line, *args)
        self.answer(problem.status, self.error_body(problem), closing=True)  # then Tornado closes
        self.ctx.active.discard(self)

    # -- the answer ---------------------------------------------------------------------------

    def answer(self, status: int, body: dict[str, Any], closing: bool = False, retry_after_seconds: int = 0) -> None:
        if self.answered:
            return
        payload = SUCCESS_BYTES if body is SUCCESS else orjson.dumps(body)
        headers = HTTPHeaders()
        headers["Server"] = SERVER
        headers["Date"] = _Date.now()
        headers["Content-Type"] = JSON
        headers["Cache-Control"] = "no-store"
        for name, value in self.ctx.cors.headers(self.request.headers.get("Origin"), self.sources).items():
            headers[name] = value
        if status == 503:
            headers["Retry-After"] = retry_after(self.ctx.config.receiver.retry_after_seconds)
        elif retry_after_seconds:
            headers["Retry-After"] = str(retry_after_seconds)
        headers["Content-Length"] = str(len(payload))
        if closing:
            headers["Connection"] = "close"
        connection = self.request.connection
        assert connection is not None
        self.answered = True  # only now: an error above still leaves _run its 500 to send
        self.ctx.counts.answered(self.route.route, status, time.monotonic() - self.started)
        connection.set_close_callback(None)
        connection.write_headers(ResponseStartLine("", status, httputil.responses.get(status, "Unknown")),
                                 headers, payload)
        connection.finish()
