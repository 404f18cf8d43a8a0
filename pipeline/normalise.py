"""Expanding a stored request into normalised events, Segment-style. Pure: no I/O.

The same stored bytes always give the same events (generated messageIds are UUID5s of the
outbox row and the message's index), so decoding a row twice is harmless.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from pipeline.envelope import BATCH, SINGLE, TOO_DEEP, WEBHOOK, Envelope, Refused, dumped, judge, open_envelope
from pipeline.messages import Problem, message_type, parse_timestamp, present
from pipeline.sources import SourceRegistry

# Fixed forever: changing it would give stored requests new ids and defeat deduplication.
MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c7a52-5b0e-4f7e-9a38-1d3c2b8e4a10")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ZERO = timedelta(0)


@dataclass(frozen=True)
class StoredRequest:
    """The outbox columns that decoding needs."""

    id: int
    received_at_ms: int
    route: str
    body: bytes
    remote_addr: str | None = None
    auth_key: str | None = None
    override_key: str | None = None
    user_agent: str | None = None


# Not frozen: one is built per event decoded, and a frozen dataclass's __init__ (a
# object.__setattr__ per field) cost 3-4x a plain one with slots. Nothing changes it.
@dataclass(slots=True)
class DecodedEvent:
    source: str
    message_id: str
    type: str
    event_name: str | None
    payload: dict[str, Any]
    # The payload as stored: written once here, where a failure refuses only this message.
    payload_json: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True)
class RefusedMessage:
    index: int | None
    problem: Problem
    raw: bytes | None


@dataclass(frozen=True)
class Expansion:
    events: list[DecodedEvent]
    refused: list[RefusedMessage]


def route_kind(route: str) -> tuple[str, str | None]:
    """(body kind, route type) of a stored route name: "batch", "webhook", "track", "pixel/page"..."""
    if route == "batch":
        return BATCH, None
    if route == "webhook":
        return WEBHOOK, None
    return SINGLE, route.removeprefix("pixel/")


def expand(request: StoredRequest, sources: SourceRegistry, *, max_message_bytes: int,
           add_context_ip: bool = True) -> Expansion:
    """Every accepted message of ``request`` as a normalised event; the rest as refused."""
    kind, route_type = route_kind(request.route)
    try:
        envelope = open_envelope(request.body, kind)
    except Refused as exc:
        return Expansion([], [RefusedMessage(None, exc.problem, request.body)])
    verdicts = judge(envelope, route_type=route_type, override_key=request.override_key,
                     auth_key=request.auth_key, source_for=sources.source_for,
                     max_message_bytes=max_message_bytes, body_size=len(request.body))
    events, refused = [], []
    times = Times(request.received_at_ms)
    for verdict in verdicts:
        message = envelope.items[verdict.index]
        if verdict.problem is not None or verdict.source is None:
            problem = verdict.problem or Problem("invalid_write_key", "Invalid or missing writekey")
            refused.append(RefusedMessage(verdict.index, problem, dumped(message)))
            continue
        payload = normalise(message, envelope, request, verdict.index, route_type, add_context_ip, times)
        try:
            payload_json = orjson.dumps(payload)
        except orjson.JSONEncodeError:  # nested too deep once merged with the batch's context
            refused.append(RefusedMessage(verdict.index, TOO_DEEP, None))
            continue
        events.append(DecodedEvent(verdict.source, payload["messageId"], payload["type"],
                                   payload.get("event") if payload["type"] == "track" else None, payload,
                                   payload_json))
    return Expansion(events, refused)


def normalise(message: dict[str, Any], envelope: Envelope, request: StoredRequest, index: int,
              route_type: str | None, add_context_ip: bool, times: Times | None = None) -> dict[str, Any]:
    """The delivered form of ``message``. It is changed in place and returned: the envelope's
    items are parsed for this expansion alone."""
    batch = envelope.batch
    event = message
    event["type"] = message_type(message, route_type)
    event.pop("writeKey", None)  # a credential: never delivered downstream
    name = event.pop("eventName", None)
    if not present(event.get("event")) and name is not None:
        event["event"] = name
    if not present(event.get("messageId")):
        event["messageId"] = str(uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{request.id}:{request.received_at_ms}:{index}"))
    context = deep_merge(batch.get("context") or {}, message.get("context") or {})
    if add_context_ip and not context.get("ip") and request.remote_addr:
        context["ip"] = request.remote_addr
    # A pixel is fetched by the browser itself (an <img>, no SDK to fill the context in): its
    # User-Agent is the one the event happened in.
    if request.user_agent and not context.get("userAgent") and request.route.startswith("pixel/"):
        context["userAgent"] = request.user_agent
    event["context"] = context
    event["integrations"] = deep_merge(batch.get("integrations") or {}, message.get("integrations") or {})
    event.update((times or Times(request.received_at_ms)).of(message, batch))
    for key in ("originalTimestamp", "sentAt"):
        if event.get(key) is None:
            event.pop(key, None)
    return event


# Times as integer microseconds since the epoch: exact, like datetime arithmetic, and cheap.
_MICROSECOND = timedelta(microseconds=1)
# datetime's range: a corrected timestamp outside it cannot be written (datetime would overflow).
_MIN_US = (datetime.min.replace(tzinfo=timezone.utc) - EPOCH) // _MICROSECOND
_MAX_US = (datetime.max.replace(tzinfo=timezone.utc) - EPOCH) // _MICROSECOND


class Times:
    """receivedAt, sentAt, originalTimestamp and the clock-skew corrected timestamp of the
    messages of one request: receivedAt is formatted once, each distinct time string (a
    batch's sentAt is every message's) is parsed and formatted once, and each second's
    "YYYY-MM-DDTHH:MM:SS" once; the corrected timestamps, one per message, are integer sums."""

    def __init__(self, received_at_ms: int) -> None:
        self._seconds: dict[int, str] = {}
        self.received_us = received_at_ms * 1000
        self.received_iso = self._iso(self.received_us)
        self._parsed: dict[str, tuple[int, str] | None] = {}

    def _parse(self, raw: Any) -> tuple[int, str] | None:
        if not isinstance(raw, str):
            return None
        try:
            return self._parsed[raw]
        except KeyError:
            pass
        moment = (parse_timestamp(raw) - EPOCH) // _MICROSECOND
        parsed = self._parsed[raw] = (moment, self._iso(moment))
        return parsed

    def _iso(self, moment_us: int) -> str:
        """As :func:`iso_ms`, for a time in microseconds since the epoch (within datetime's range)."""
        second, microsecond = divmod(moment_us, 1_000_000)
        prefix = self._seconds.get(second)
        if prefix is None:
            prefix = self._seconds[second] = (EPOCH + timedelta(seconds=second)).isoformat()[:19]
        return f"{prefix}.{microsecond // 1000:03d}Z"

    def of(self, message: dict[str, Any], batch: dict[str, Any]) -> dict[str, str]:
        sent = self._parse(message.get("sentAt") or batch.get("sentAt"))
        original = self._parse(message.get("timestamp") or message.get("originalTimestamp"))
        times = {"receivedAt": self.received_iso}
        if original is None:
            times["timestamp"] = self.received_iso
            if sent is not None:
                times["sentAt"] = sent[1]
            return times
        if sent is None:
            times["timestamp"] = times["originalTimestamp"] = original[1]
            return times
        # The device clock may be wrong; the time it took between the event and sending it
        # is not. Segment: timestamp = receivedAt - (sentAt - originalTimestamp).
        corrected = self.received_us - (sent[0] - original[0])
        times["timestamp"] = self._iso(corrected) if _MIN_US <= corrected <= _MAX_US else original[1]
        times["originalTimestamp"] = original[1]
        times["sentAt"] = sent[1]
        return times


def iso_ms(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and Z: 2026-11-26T10:00:00.123Z."""
    if moment.utcoffset() != ZERO:  # naive (local time) or another zone
        moment = moment.astimezone(timezone.utc)
    # isoformat, not strftime: strftime("%Y") gives "999" for the year 999, not "0999". Its
    # first 23 characters are the date and time to the millisecond; then comes "+00:00".
    return moment.isoformat(timespec="milliseconds")[:23] + "Z"


def deep_merge(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``base`` overlaid with ``own``; nested objects are merged, ``own``'s keys win."""
    merged = dict(base)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

