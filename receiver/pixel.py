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

from pipeline.envelope import TOO_DEEP, Refused, dumped, parse_json
from pipeline.messages import Problem, validate_message
from pipeline.sources import message_write_key
from receiver.auth import basic_auth_username
from receiver.answers import single_error
from receiver.body import TOO_LARGE
from receiver.context import ReceiverContext
from receiver.counts import ACCEPTED, REJECTED
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


def invalid_pixel(details: str) -> Refused:
    return Refused(Problem("invalid_pixel", "Invalid pixel data", details))


def utf8(raw: bytes, what: str) -> str:
    """The text of a query value; a value that is not UTF-8 is refused, never patched up."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_pixel(f"{what} is not valid UTF-8") from None


def message_from_query(arguments: dict[str, list[bytes]]) -> dict[str, Any]:
    """Build a message from dotted query keys: ``properties.plan=pro`` -> {"properties": {"plan": "pro"}}.

    Raise :class:`Refused` for a key or value that is not UTF-8, or for keys that contradict
    each other (``a=1`` and ``a.b=2``: one would have to be dropped)."""
    message: dict[str, Any] = {}
    for latin1_key, values in arguments.items():
        # Tornado hands query keys over decoded as Latin-1 (values stay bytes): undo that.
        key = utf8(latin1_key.encode("latin-1"), "a query key")
        node = message
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise invalid_pixel(f"query keys {'.'.join(parents[:depth + 1])!r} and {key!r} contradict each other")
            node = child
        if isinstance(node.get(leaf), dict):
            raise invalid_pixel(f"query key {key!r} and keys below it contradict each other")
        node[leaf] = utf8(values[-1], f"the value of {key!r}")
    return message


class PixelHandler(RecordingHandler):
    def initialize(self, ctx: ReceiverContext, route_type: str = "track") -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.route_type = route_type
        self.route = f"pixel/{route_type}"

    async def get(self, *_: Any) -> None:
        # Read by hand: get_query_argument answers a JSON 400 for a value that is not UTF-8, and
        # an <img> must get its GIF whatever the query.
        values = self.request.query_arguments.get("data")
        data = values[-1] if values else None
        raw = data if data is not None else self.request.query.encode("utf-8", "replace")
        auth_key = basic_auth_username(self.request.headers.get("Authorization"))
        try:
            body, message = self._message(data)
        except Refused as exc:
            self.ctx.counts.message(None, REJECTED)
            await self.record_rejected(exc.problem, raw)
            return self._gif()
        problem = validate_message(message, self.route_type)
        source = None
        if problem is None:
            source = self.ctx.sources.source_for(message_write_key(message, None, None, auth_key))
            if source is None:
                problem = Problem("invalid_write_key", "Invalid or missing writekey")
        if problem is None and self.ctx.guard.active:
            refusal = self.ctx.guard.check(self.request.headers.get("Origin"), [source or ""], self.request.remote_ip,
                                           self.route)
            if refusal is not None:
                self.ctx.counts.message(source, REJECTED)
                if refusal.record:
                    await self.record_rejected(refusal.problem, body, refusal.source)
                if refusal.problem.status != 429:  # bad input for this source: the GIF
                    return self._gif()
                # Not the GIF: a 200 would say the event is stored. Like a 503, this is "not
                # now", and the page (or its pixel library) may send it again later.
                self.set_header("Retry-After", str(refusal.retry_after))
                return self.answer(429, single_error(refusal.problem))
        if problem is not None:
            self.ctx.counts.message(source, REJECTED)
            await self.record_rejected(problem, body)
            return self._gif()
        if await self.commit_outbox(body, source or "", auth_key):
            self.ctx.counts.message(source, ACCEPTED)
            self._gif()

    def _message(self, data: bytes | None) -> tuple[bytes, Any]:
        if data is None:
            message = message_from_query(self.request.query_arguments)
            body = dumped(message)
            if body is None:  # dotted keys nested deeper than JSON can be written
                raise Refused(TOO_DEEP)
        else:
            try:
                body = decode_data(utf8(data, "data"))
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
