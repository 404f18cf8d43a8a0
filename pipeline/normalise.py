"""Expanding a stored request into normalised events, Segment-style. Pure: no I/O.

The same stored bytes always give the same events (generated messageIds are UUID5s of the
outbox row and the message's index), so decoding a row twice is harmless.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from pipeline.envelope import BATCH, SINGLE, WEBHOOK, Envelope, Refused, judge, open_envelope
from pipeline.messages import Problem, message_type, parse_timestamp, present
from pipeline.sources import SourceRegistry

# Fixed forever: changing it would give stored requests new ids and defeat deduplication.
MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c7a52-5b0e-4f7e-9a38-1d3c2b8e4a10")


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


@dataclass(frozen=True)
class DecodedEvent:
    source: str
    message_id: str
    type: str
    event_name: str | None
    payload: dict[str, Any]


@dataclass(frozen=True)
class RefusedMessage:
    index: int | None
    problem: Problem
    raw: bytes


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
    for verdict in verdicts:
        message = envelope.items[verdict.index]
        if verdict.problem is not None or verdict.source is None:
            problem = verdict.problem or Problem("invalid_write_key", "Invalid or missing writekey")
            refused.append(RefusedMessage(verdict.index, problem, orjson.dumps(message)))
            continue
        payload = normalise(message, envelope, request, verdict.index, route_type, add_context_ip)
        events.append(DecodedEvent(verdict.source, payload["messageId"], payload["type"],
                                   payload.get("event") if payload["type"] == "track" else None, payload))
    return Expansion(events, refused)


def normalise(message: dict[str, Any], envelope: Envelope, request: StoredRequest, index: int,
              route_type: str | None, add_context_ip: bool) -> dict[str, Any]:
    batch = envelope.batch
    event = dict(message)
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
    event["context"] = context
    event["integrations"] = deep_merge(batch.get("integrations") or {}, message.get("integrations") or {})
    event.update(event_times(message, batch, request.received_at_ms))
    for key in ("originalTimestamp", "sentAt"):
        if event.get(key) is None:
            event.pop(key, None)
    return event


def event_times(message: dict[str, Any], batch: dict[str, Any], received_at_ms: int) -> dict[str, str]:
    """receivedAt, sentAt, originalTimestamp and the clock-skew corrected timestamp."""
    received = datetime.fromtimestamp(received_at_ms / 1000, tz=timezone.utc)
    sent_raw = message.get("sentAt") or batch.get("sentAt")
    original_raw = message.get("timestamp") or message.get("originalTimestamp")
    sent = parse_timestamp(sent_raw) if isinstance(sent_raw, str) else None
    original = parse_timestamp(original_raw) if isinstance(original_raw, str) else None
    timestamp = original or received
    if original is not None and sent is not None:
        try:
            # The device clock may be wrong; the time it took between the event and sending it
            # is not. Segment: timestamp = receivedAt - (sentAt - originalTimestamp).
            timestamp = received - (sent - original)
        except OverflowError:
            timestamp = original
    times = {"receivedAt": iso_ms(received), "timestamp": iso_ms(timestamp)}
    if original is not None:
        times["originalTimestamp"] = iso_ms(original)
    if sent is not None:
        times["sentAt"] = iso_ms(sent)
    return times


def iso_ms(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and Z: 2026-11-26T10:00:00.123Z."""
    moment = moment.astimezone(timezone.utc)
    # isoformat, not strftime: strftime("%Y") gives "999" for the year 999, not "0999".
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def deep_merge(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``base`` overlaid with ``own``; nested objects are merged, ``own``'s keys win."""
    merged = dict(base)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

