"""Tracking pixels: GET /v1/pixel/<type>?data=<base64 JSON>, answered with a 1x1 GIF.

Like Segment's pixel API we answer 200 and the GIF whatever the input, since an <img> tag
cannot show an error to anyone; what we refuse is recorded in ``rejected`` with its reason.
A store that cannot take the event is different: that is a 503, so the event is not lost
silently while we claim to have it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from pipeline.envelope import Refused, parse_json
from pipeline.messages import Problem, validate_message
from pipeline.sources import message_write_key
from receiver.auth import basic_auth_username
from receiver.body import TOO_LARGE
from receiver.context import ReceiverContext
from receiver.handlers import RecordingHandler

TRANSPARENT_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


def decode_data(data: str) -> bytes:
    """Standard or URL-safe base64, with or without padding; raise ValueError if neither."""
    # A '+' left unescaped in a query string arrives as a space.
    text = data.replace(" ", "+")
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data is not base64 ({exc})") from None


def message_from_query(arguments: dict[str, list[bytes]]) -> dict[str, Any]:
    """Build a message from dotted query keys: ``properties.plan=pro`` -> {"properties": {"plan": "pro"}}."""
    message: dict[str, Any] = {}
    for key, values in arguments.items():
        node = message
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = values[-1].decode("utf-8", "replace")
    return message


class PixelHandler(RecordingHandler):
    def initialize(self, ctx: ReceiverContext, route_type: str = "track") -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.route_type = route_type
        self.route = f"pixel/{route_type}"

    async def get(self, *_: Any) -> None:
        data = self.get_query_argument("data", None)
        raw = data.encode("utf-8", "replace") if data is not None else self.request.query.encode("utf-8", "replace")
        auth_key = basic_auth_username(self.request.headers.get("Authorization"))
        try:
            body, message = self._message(data)
        except Refused as exc:
            await self.record_rejected(exc.problem, raw)
            return self._gif()
        problem = validate_message(message, self.route_type)
        source = None
        if problem is None:
            source = self.ctx.sources.source_for(message_write_key(message, None, None, auth_key))
            if source is None:
                problem = Problem("invalid_write_key", "Invalid or missing writekey")
        if problem is None and self.ctx.guard.active:
            # An <img> cannot read an error: a refusal is recorded (a 403) or counted (a 429).
            refusal = self.ctx.guard.check(self.request.headers.get("Origin"), [source or ""], self.request.remote_ip,
                                           self.route)
            if refusal is not None and refusal.problem.status == 429:
                return self._gif()
            if refusal is not None:
                await self.record_rejected(refusal.problem, body, refusal.source)
                return self._gif()
        if problem is not None:
            await self.record_rejected(problem, body)
            return self._gif()
        if await self.commit_outbox(body, source or "", auth_key):
            self._gif()

    def _message(self, data: str | None) -> tuple[bytes, Any]:
        if data is None:
            message = message_from_query(self.request.query_arguments)
            body = orjson.dumps(message)
        else:
            try:
                body = decode_data(data)
            except ValueError as exc:
                raise Refused(Problem("invalid_base64", "Invalid pixel data", str(exc))) from None
            message = parse_json(body)
        if len(body) > self.ctx.config.receiver.max_call_bytes:
            raise Refused(TOO_LARGE)
        return body, message

    def _gif(self) -> None:
        self.set_status(200)
        self.set_header("Content-Type", "image/gif")
        self.set_header("Cache-Control", "no-cache, no-store, must-revalidate, max-age=0")
        self.set_header("Pragma", "no-cache")
        self.set_header("Expires", "0")
        self.finish(TRANSPARENT_GIF)
