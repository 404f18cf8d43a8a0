"""The HTTP handlers: every /v1 route, /health, and the JSON errors they share."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import orjson
from tornado.web import RequestHandler, stream_request_body

from pipeline.envelope import BATCH, SINGLE, WEBHOOK, Refused, judge, open_envelope
from pipeline.messages import Problem
from pipeline.store import StoreUnavailable, now_ms
from receiver.answers import STORE_UNAVAILABLE, SUCCESS, batch_error, batch_verdicts, single_error
from receiver.auth import basic_auth_username
from receiver.body import TOO_LARGE, BodyError, BodyReader, encoding_problem
from receiver.context import ReceiverContext
from receiver.cors import cors_headers

log = logging.getLogger("trackrelay.receiver")

SUCCESS_BYTES = orjson.dumps(SUCCESS)

# Compressed bodies may be a little larger than what they inflate to (headers, stored
# blocks); this much slack keeps Content-Length from refusing a body that fits once inflated.
COMPRESSED_SLACK = 1024


class ApiHandler(RequestHandler):
    """CORS on every answer, JSON bodies for every error, collaborators from ``initialize``."""

    ctx: ReceiverContext

    def initialize(self, ctx: ReceiverContext, **_: Any) -> None:
        self.ctx = ctx
        self.set_default_headers()

    def set_default_headers(self) -> None:
        # Tornado calls this once before initialize() (no ctx yet) and again after clear().
        if hasattr(self, "ctx") and self.request.path.startswith("/v1/"):
            allowed = self.ctx.config.receiver.cors_origins
            for name, value in cors_headers(self.request.headers.get("Origin"), allowed).items():
                self.set_header(name, value)
        self.set_header("Cache-Control", "no-store")

    def options(self, *_: Any) -> None:
        self.set_status(204)
        self.finish()

    def answer(self, status: int, body: dict[str, Any]) -> None:
        if status != 200:
            self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        if status == 503:
            self.set_header("Retry-After", str(math.ceil(self.ctx.config.receiver.retry_after_seconds)))
        self.finish(SUCCESS_BYTES if body is SUCCESS else orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (404, 405, unexpected exceptions) in the same JSON shape.
        reason = self._reason
        problem = Problem(f"http_{status_code}", reason, status=status_code, error=reason)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(orjson.dumps(single_error(problem)))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if value is not None and getattr(value, "status_code", 500) < 500:
            return  # a client error, answered; not ours to log
        log.error("event=handler_error path=%s error=%r", self.request.path, str(value), exc_info=(typ, value, tb))


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        self.answer(404, single_error(Problem("not_found", "Not Found", f"no route {self.request.path}",
                                              status=404, error="Not Found")))


class HealthHandler(ApiHandler):
    async def get(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.ctx.store.ping),
                                   self.ctx.config.database.lock_timeout_seconds + 1)
        except (StoreUnavailable, asyncio.TimeoutError) as exc:
            self.set_status(503)
            self.finish({"status": "unavailable", "error": str(exc) or "timed out"})
            return
        self.finish({"status": "ok"})


class MetricsHandler(ApiHandler):
    """/v1/m: the browser SDK's own metrics. Acknowledged and not stored."""

    def post(self) -> None:
        self.answer(200, SUCCESS)


class RecordingHandler(ApiHandler):
    """A handler that can record what it refuses and commit what it accepts."""

    route: str

    def request_facts(self) -> dict[str, Any]:
        return {"received_at_ms": now_ms(), "route": self.route, "remote_addr": self.request.remote_ip}

    async def record_rejected(self, problem: Problem, raw: bytes | None, source: str | None = None) -> None:
        """Keep what we refused where an operator can see it; a failure here changes no answer."""
        limit = self.ctx.config.receiver.rejected_raw_bytes
        reason = f"{problem.message}: {problem.details}" if problem.details else problem.message
        row = {**self.request_facts(), "source": source, "status": problem.status, "code": problem.code,
               "reason": reason.replace("\x00", ""), "raw": raw[:limit] if raw is not None else None}
        try:
            await self.ctx.committer.commit("rejected", row)
        except StoreUnavailable as exc:
            log.warning("event=rejected_not_recorded code=%s error=%r", problem.code, str(exc))

    async def commit_outbox(self, body: bytes, source: str, auth_key: str | None,
                            override_key: str | None = None) -> bool:
        """Commit the request; answer 503 and return False if the store cannot take it."""
        user_agent = self.request.headers.get("User-Agent")
        row = {**self.request_facts(), "source": source, "body": body,
               "user_agent": user_agent[:512].replace("\x00", "") if user_agent else None,
               # Postgres text cannot hold NUL; a Basic username may carry one (open mode keeps it).
               "auth_key": auth_key.replace("\x00", "") if auth_key else None, "override_key": override_key}
        try:
            await self.ctx.committer.commit("outbox", row)
        except StoreUnavailable as exc:
            log.warning("event=store_unavailable route=%s error=%r", self.route, str(exc))
            self.answer(503, self.error_body(STORE_UNAVAILABLE))
            return False
        return True

    def error_body(self, problem: Problem) -> dict[str, Any]:
        return single_error(problem)

    def on_finish(self) -> None:
        self.ctx.active.discard(self)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.ctx.active.discard(self)


@stream_request_body
class IngestHandler(RecordingHandler):
    """POST of one message, a batch, or a webhook: streamed, limited, judged, committed."""

    def initialize(self, ctx: ReceiverContext, route: str = "", kind: str = SINGLE,  # type: ignore[override]
                   route_type: str | None = None) -> None:
        super().initialize(ctx)
        self.route, self.kind, self.route_type = route, kind, route_type
        ctx.active.add(self)
        self.refusal: Problem | None = None
        self.batch_format = kind == BATCH
        receiver = ctx.config.receiver
        self.limit = receiver.max_call_bytes if kind == SINGLE else receiver.max_batch_bytes
        self.reader = BodyReader(None, self.limit)

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        # Tornado counts a chunk's declared length before we see a byte of it and hands chunked
        # bodies over in 64 KB pieces, so its limit would answer a bare 400 before
        # data_received answers 413. We enforce the discard cap ourselves (the connection
        # closes right after that 413), so Tornado's limit only has to stay out of the way.
        self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
        encoding = self.request.headers.get("Content-Encoding")
        self.refusal = encoding_problem(encoding)
        if self.refusal is not None:
            return
        self.reader = BodyReader(encoding, self.limit)
        declared = self.request.headers.get("Content-Length")
        if declared is None:
            return  # chunked: decided while streaming
        compressed = (encoding or "identity").strip().lower() != "identity"
        if int(declared) > self.limit + (COMPRESSED_SLACK + self.limit // 100 if compressed else 0):
            self.reader.too_large = True
            # Answer at once when the client waits for "100 Continue" (it then never sends the
            # body) or when the body is past what we would read just to throw away.
            if self.request.headers.get("Expect", "").lower() == "100-continue" or \
                    int(declared) > self.ctx.config.receiver.discard_cap_bytes:
                self.refuse_now(TOO_LARGE)

    def data_received(self, chunk: bytes) -> None:
        self.reader.feed(chunk)
        if self.reader.received > self.ctx.config.receiver.discard_cap_bytes and not self._finished:
            self.refuse_now(TOO_LARGE)  # Tornado closes the connection after this answer

    def refuse_now(self, problem: Problem) -> None:
        self.answer(problem.status, self.error_body(problem))
        asyncio.ensure_future(self.record_rejected(problem, None))

    def error_body(self, problem: Problem) -> dict[str, Any]:
        return batch_error(problem) if self.batch_format else single_error(problem)

    async def refuse(self, problem: Problem, raw: bytes | None, body: dict[str, Any] | None = None) -> None:
        await self.record_rejected(problem, raw)
        self.answer(problem.status, body if body is not None else self.error_body(problem))

    async def post(self, *_: Any) -> None:
        if self.refusal is not None:
            return await self.refuse(self.refusal, None)
        try:
            body = self.reader.finish()
        except BodyError as exc:
            return await self.refuse(exc.problem, None)
        receiver = self.ctx.config.receiver
        auth_key = basic_auth_username(self.request.headers.get("Authorization"))
        # Only webhooks take ?writeKey= (the spec: it overwrites the incoming data); empty is none.
        override_key = (self.get_query_argument("writeKey", None) or None) if self.kind == WEBHOOK else None
        try:
            envelope = open_envelope(body, self.kind)
        except Refused as exc:
            return await self.refuse(exc.problem, body)
        self.batch_format = envelope.is_batch or self.kind == BATCH
        if not envelope.is_batch and len(body) > receiver.max_call_bytes:
            return await self.refuse(TOO_LARGE, body)  # one message posted to a batch-sized route
        verdicts = judge(envelope, route_type=self.route_type, override_key=override_key,
                         auth_key=auth_key, source_for=self.ctx.sources.source_for,
                         max_message_bytes=receiver.max_message_bytes, body_size=len(body))
        accepted = [v for v in verdicts if v.problem is None]
        if not self.batch_format:
            if not accepted:
                problem = verdicts[0].problem
                assert problem is not None
                return await self.refuse(problem, body)
            if await self.commit_outbox(body, accepted[0].source or "", auth_key, override_key):
                self.answer(200, SUCCESS)
            return
        answer, summary = batch_verdicts(verdicts)
        if not accepted:
            assert summary is not None
            return await self.refuse(summary, body, answer)
        if await self.commit_outbox(body, accepted[0].source or "", auth_key, override_key):
            # The failed items of a partial success are recorded once, by the pipeline, when it
            # decodes this stored request.
            self.answer(200 if summary is None else receiver.partial_success_status, answer)
