"""The Tornado handlers: preflights and wrong methods on every /v1 route, /v1/m, /health,
unknown paths, and the JSON errors they share. (Event POSTs: :mod:`receiver.ingest`.)"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import orjson
from tornado.web import HTTPError, RequestHandler

from pipeline.messages import Problem
from pipeline.store import RowRefused, StoreUnavailable
from receiver.answers import (JSON, STORE_REFUSED, STORE_UNAVAILABLE, SUCCESS, SUCCESS_BYTES, not_found, retry_after,
                              single_error)
from receiver.context import ReceiverContext
from receiver.recording import commit_request, record_rejected

log = logging.getLogger("trackrelay.receiver")

# The paths browsers call cross-origin, whose answers carry CORS headers.
BROWSER_PATHS = ("/v1/", "/sourceConfig", "/analytics.js/", "/analytics-next/")
# Paths that carry a write key (the SDK settings and the bundle): never echoed or logged whole.
_KEY_IN_PATH = re.compile(r"^(/v1/projects/|/analytics\.js/v1/)[^/]*")


def redacted_path(path: str) -> str:
    """``path`` as it may be shown: a write key in it replaced by ``<writeKey>``."""
    return _KEY_IN_PATH.sub(r"\1<writeKey>", path)



class ApiHandler(RequestHandler):
    """CORS on every answer, JSON bodies for every error, collaborators from ``initialize``."""

    ctx: ReceiverContext
    delegated: tuple[str, ...] = ()  # methods that receiver/ingest.py serves on this handler's paths

    def initialize(self, ctx: ReceiverContext, **_: Any) -> None:
        self.ctx = ctx
        self.set_default_headers()

    def set_default_headers(self) -> None:
        # Tornado calls this once before initialize() (no ctx yet) and again after clear().
        if hasattr(self, "ctx") and self.request.path.startswith(BROWSER_PATHS):
            for name, value in self.ctx.cors.headers(self.request.headers.get("Origin"), self.cors_sources()).items():
                self.set_header(name, value)
        self.set_header("Cache-Control", "no-store")

    def cors_sources(self) -> list[str] | None:
        """The sources whose origin lists this answer follows; None: not known (receiver/cors.py)."""
        return None

    def options(self, *_: Any) -> None:
        if not self.request.path.startswith(BROWSER_PATHS):
            raise HTTPError(405)
        headers = self.request.headers
        preflight = self.ctx.cors.preflight_headers(
            headers.get("Origin"), headers.get("Access-Control-Request-Headers"),
            headers.get("Access-Control-Request-Private-Network", "").lower() == "true", self.cors_sources())
        for name, value in preflight.items():
            self.set_header(name, value)
        self.set_status(204)
        self.finish()

    def answer(self, status: int, body: dict[str, Any]) -> None:
        if status != 200:
            self.set_status(status)
        self.set_header("Content-Type", JSON)
        if status == 503:
            self.set_header("Retry-After", retry_after(self.ctx.config.receiver.retry_after_seconds))
        self.finish(SUCCESS_BYTES if body is SUCCESS else orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (404, 405, unexpected exceptions) in the same JSON shape.
        reason = self._reason
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))  # a 405 must say (RFC 9110)
        problem = Problem(f"http_{status_code}", reason, status=status_code, error=reason)
        self.set_header("Content-Type", JSON)
        self.finish(orjson.dumps(single_error(problem)))

    def allowed_methods(self) -> list[str]:
        """The methods this path answers: those the handler defines (OPTIONS on browser paths)."""
        methods = [m for m in ("GET", "HEAD", "POST") if m in self.delegated
                   or getattr(type(self), m.lower()) is not getattr(RequestHandler, m.lower())]
        return methods + ["OPTIONS"] if self.request.path.startswith(BROWSER_PATHS) else methods

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if value is not None and getattr(value, "status_code", 500) < 500:
            return  # a client error, answered; not ours to log
        log.error("event=handler_error path=%s error=%r", redacted_path(self.request.path), str(value),
                  exc_info=(typ, value, tb))


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        self.answer(404, single_error(not_found(f"no route {redacted_path(self.request.path)}")))


class HealthHandler(ApiHandler):
    """200 when the store answers and takes writes. While the last commit failed, "answers" is
    not enough (a held lock, a full disk or a read-only file leave reads working): a write is
    tried, and the store is healthy again only once one commits."""

    async def get(self) -> None:
        committer = self.ctx.committer
        try:
            await self._within(self.ctx.store.ping)
            if committer.failing is not None:
                await self._within(self.ctx.store.probe_write)
                committer.failing = None
        except (StoreUnavailable, asyncio.TimeoutError) as exc:
            self.set_status(503)
            writes = " (writes failing)" if committer.failing is not None else ""
            self.finish({"status": "unavailable", "error": (str(exc) or "timed out") + writes})
            return
        self.finish({"status": "ok"})

    async def _within(self, call: Callable[[], None]) -> None:
        await asyncio.wait_for(asyncio.to_thread(call), self.ctx.config.database.lock_timeout_seconds + 1)


class MetricsHandler(ApiHandler):
    """/v1/m: the browser SDK's own metrics. Acknowledged and not stored."""

    def post(self) -> None:
        self.answer(200, SUCCESS)


class IngestPathHandler(ApiHandler):
    """The ingest paths for anything but POST (which :mod:`receiver.ingest` serves): CORS
    preflights, and a JSON 405 for other methods."""

    delegated = ("POST",)


class RecordingHandler(ApiHandler):
    """A handler that can record what it refuses and commit what it accepts."""

    route: str

    async def record_rejected(self, problem: Problem, raw: bytes | None, source: str | None = None) -> None:
        await record_rejected(self.ctx, self.request, self.route, problem, raw, source)

    async def commit_outbox(self, body: bytes, source: str, auth_key: str | None) -> bool:
        """Commit the request; answer 503 and return False if the store cannot take it."""
        try:
            await commit_request(self.ctx, self.request, self.route, body, source, auth_key)
        except StoreUnavailable:
            self.answer(503, single_error(STORE_UNAVAILABLE))
            return False
        except RowRefused:
            self.answer(STORE_REFUSED.status, single_error(STORE_REFUSED))
            return False
        return True
