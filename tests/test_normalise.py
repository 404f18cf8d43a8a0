"""pipeline.normalise.expand: a stored request becomes normalised events, Segment-style (pure)."""

from __future__ import annotations

import random
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from pipeline.config import SourceConfig
from pipeline.messages import parse_timestamp
from pipeline.normalise import MESSAGE_ID_NAMESPACE, DecodedEvent, Expansion, StoredRequest, Times, expand, iso_ms
from pipeline.sources import SourceRegistry

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
RECEIVED = datetime(2026, 11, 26, 10, 0, 0, 500000, tzinfo=timezone.utc)
RECEIVED_MS = (RECEIVED - EPOCH) // timedelta(milliseconds=1)
ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
OPEN = SourceRegistry(())
CLOSED = SourceRegistry((SourceConfig("web", ("wk_web",)), SourceConfig("app", ("wk_app",))))


def iso(ms: int) -> str:
    """Milliseconds since the epoch as the ISO-8601 UTC string with milliseconds and Z."""
    moment = EPOCH + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def ms(text: str) -> int:
    return (datetime.fromisoformat(text) - EPOCH) // timedelta(milliseconds=1)


def stored(body: Any, route: str = "batch", *, row_id: int = 1, received_at_ms: int = RECEIVED_MS,
           remote_addr: str | None = "203.0.113.7", auth_key: str | None = None,
           override_key: str | None = None, user_agent: str | None = None) -> StoredRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return StoredRequest(row_id, received_at_ms, route, raw, remote_addr, auth_key, override_key, user_agent)


def run(request: StoredRequest, sources: SourceRegistry = OPEN, add_context_ip: bool = True) -> Expansion:
    return expand(request, sources, max_message_bytes=15360, add_context_ip=add_context_ip)


def only_event(request: StoredRequest, sources: SourceRegistry = OPEN, add_context_ip: bool = True) -> DecodedEvent:
    expansion = run(request, sources, add_context_ip)
    assert expansion.refused == []
    assert len(expansion.events) == 1
    return expansion.events[0]


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "userId": "u1", **fields}


def test_a_single_track_is_normalised_whole() -> None:
    message = {"event": "Signed Up", "userId": "u1", "messageId": "m-1", "properties": {"plan": "pro"},
               "timestamp": "2026-11-26T09:00:00.000Z", "context": {"library": {"name": "analytics-python",
                                                                              "version": "2.3.0"}}}

    event = only_event(stored(message, "track"))

    assert event == DecodedEvent("default", "m-1", "track", "Signed Up", {
        "type": "track", "event": "Signed Up", "userId": "u1", "messageId": "m-1", "properties": {"plan": "pro"},
        "context": {"library": {"name": "analytics-python", "version": "2.3.0"}, "ip": "203.0.113.7"},
        "integrations": {}, "receivedAt": "2026-11-26T10:00:00.500Z",
        "timestamp": "2026-11-26T09:00:00.000Z", "originalTimestamp": "2026-11-26T09:00:00.000Z"})


def test_batch_context_is_deep_merged_into_each_message_and_the_message_wins_at_every_depth() -> None:
    batch_context = {"library": {"name": "analytics-node", "version": "1.0"}, "locale": "en-GB",
                     "app": {"name": "Shop", "build": {"number": 7, "channel": "beta"}}}
    own_context = {"locale": "fr-FR", "app": {"build": {"channel": "stable"}}, "page": {"path": "/x"}}
    body = {"batch": [track(context=own_context), track()], "context": batch_context}

    first, second = run(stored(body), add_context_ip=False).events

    assert first.payload["context"] == {
        "library": {"name": "analytics-node", "version": "1.0"}, "locale": "fr-FR",
        "app": {"name": "Shop", "build": {"number": 7, "channel": "stable"}}, "page": {"path": "/x"}}
    assert second.payload["context"] == batch_context


def test_batch_integrations_are_deep_merged_into_each_message_and_the_message_wins() -> None:
    batch_integrations = {"All": True, "Mixpanel": {"apiKey": "k", "opts": {"a": 1, "b": 2}}, "hook": True}
    own = {"Mixpanel": {"opts": {"b": 3}}, "hook": False}
    body = {"batch": [track(integrations=own), track()], "integrations": batch_integrations}

    first, second = run(stored(body)).events

    assert first.payload["integrations"] == {"All": True, "Mixpanel": {"apiKey": "k", "opts": {"a": 1, "b": 3}},
                                             "hook": False}
    assert second.payload["integrations"] == batch_integrations


def test_batch_sent_at_applies_to_messages_without_their_own() -> None:
    body = {"batch": [track(), track(sentAt="2026-11-26T09:30:00.000Z")], "sentAt": "2026-11-26T09:00:00.000Z"}

    first, second = run(stored(body)).events

    assert first.payload["sentAt"] == "2026-11-26T09:00:00.000Z"
    assert second.payload["sentAt"] == "2026-11-26T09:30:00.000Z"


def test_write_key_precedence_is_message_then_batch_then_basic_auth() -> None:
    body = {"batch": [track(writeKey="wk_app"), track()], "writeKey": "wk_web"}

    assert [e.source for e in run(stored(body, auth_key="wk_app"), CLOSED).events] == ["app", "web"]
    assert [e.source for e in run(stored({"batch": [track()]}, auth_key="wk_app"), CLOSED).events] == ["app"]
    assert [e.source for e in run(stored(track(writeKey="wk_web"), "track", auth_key="wk_app"), CLOSED).events] \
        == ["web"]


def test_a_message_with_an_unknown_key_of_its_own_is_refused_even_when_the_batch_key_is_good() -> None:
    body = {"batch": [track(writeKey="wk_nobody"), track()], "writeKey": "wk_web"}

    expansion = run(stored(body), CLOSED)

    assert [(e.source, e.payload["userId"]) for e in expansion.events] == [("web", "u1")]
    assert [(r.index, r.problem.code) for r in expansion.refused] == [(0, "invalid_write_key")]


def test_the_webhook_override_key_replaces_every_message_key_and_decides_the_source() -> None:
    body = {"batch": [track(writeKey="wk_web"), track()], "writeKey": "wk_web"}

    expansion = run(stored(body, "webhook", auth_key="wk_web", override_key="wk_app"), CLOSED)

    assert [e.source for e in expansion.events] == ["app", "app"]
    assert expansion.refused == []
    assert ["writeKey" in e.payload for e in expansion.events] == [False, False]


def test_a_webhook_single_message_takes_the_override_key_too() -> None:
    event = only_event(stored(track(writeKey="wk_web"), "webhook", override_key="wk_app"), CLOSED)

    assert event.source == "app"


def test_an_unknown_override_key_refuses_every_message_whatever_their_own_keys() -> None:
    body = {"batch": [track(writeKey="wk_web"), track(writeKey="wk_app")]}

    expansion = run(stored(body, "webhook", override_key="wk_nobody"), CLOSED)

    assert expansion.events == []
    assert [(r.index, r.problem.code) for r in expansion.refused] == [(0, "invalid_write_key"),
                                                                       (1, "invalid_write_key")]


def test_write_key_is_removed_from_what_is_delivered() -> None:
    event = only_event(stored(track(writeKey="wk_web"), "track"), CLOSED)

    assert "writeKey" not in event.payload
    assert b"wk_web" not in orjson.dumps(event.payload)


def test_a_message_id_sent_is_kept() -> None:
    assert only_event(stored(track(messageId="keep-me"), "track")).message_id == "keep-me"


def test_a_missing_message_id_is_a_uuid5_of_the_row_and_the_index() -> None:
    body = {"batch": [track(), track(messageId=""), track()]}
    request = stored(body, row_id=41)

    first = [e.message_id for e in run(request).events]
    again = [e.message_id for e in run(stored(body, row_id=41)).events]
    other_row = [e.message_id for e in run(stored(body, row_id=42)).events]

    assert first == again
    assert len(set(first)) == 3
    assert set(first).isdisjoint(other_row)
    assert [uuid.UUID(i).version for i in first] == [5, 5, 5]
    assert first[0] == str(uuid.uuid5(MESSAGE_ID_NAMESPACE, f"41:{RECEIVED_MS}:0"))
    assert [e.payload["messageId"] for e in run(request).events] == first


@pytest.mark.parametrize(("timestamp", "sent_at", "expected"), [
    # Device clock 1 h slow; 5.25 s passed between the event and the send.
    ("2026-11-26T09:00:00.000Z", "2026-11-26T09:00:05.250Z", RECEIVED_MS - 5250),
    # Device clock ahead, offsets in other zones.
    ("2026-11-26T13:00:00.000+02:00", "2026-11-26T11:00:01.125Z", RECEIVED_MS - 1125),
    ("2026-11-26T09:00:00.999-01:30", "2026-11-26T10:31:00.000Z", RECEIVED_MS - 59_001),
])
def test_timestamp_is_received_at_minus_the_time_between_the_event_and_the_send(
        timestamp: str, sent_at: str, expected: int) -> None:
    event = only_event(stored(track(timestamp=timestamp, sentAt=sent_at), "track"))

    assert event.payload["timestamp"] == iso(expected)
    assert event.payload["receivedAt"] == iso(RECEIVED_MS)
    assert event.payload["originalTimestamp"] == iso(ms(timestamp))
    assert event.payload["sentAt"] == iso(ms(sent_at))


def test_clock_skew_correction_uses_the_batch_sent_at() -> None:
    body = {"batch": [track(timestamp="2030-01-01T00:00:00.000Z")], "sentAt": "2030-01-01T00:00:02.000Z"}

    (event,) = run(stored(body)).events

    assert event.payload["timestamp"] == "2026-11-26T09:59:58.500Z"


def test_original_timestamp_sent_instead_of_timestamp_is_used_the_same_way() -> None:
    event = only_event(stored(track(originalTimestamp="2026-11-26T09:00:00.000Z",
                                    sentAt="2026-11-26T09:00:01.000Z"), "track"))

    assert event.payload["originalTimestamp"] == "2026-11-26T09:00:00.000Z"
    assert event.payload["timestamp"] == "2026-11-26T09:59:59.500Z"


def test_without_sent_at_the_timestamp_is_the_original() -> None:
    event = only_event(stored(track(timestamp="2026-11-26T12:00:00.25+02:00"), "track"))

    assert event.payload["timestamp"] == "2026-11-26T10:00:00.250Z"
    assert event.payload["originalTimestamp"] == "2026-11-26T10:00:00.250Z"
    assert "sentAt" not in event.payload


def test_without_any_time_the_timestamp_is_received_at() -> None:
    event = only_event(stored(track(sentAt="2026-11-26T09:00:00Z"), "track"))

    assert event.payload["timestamp"] == "2026-11-26T10:00:00.500Z"
    assert event.payload["receivedAt"] == "2026-11-26T10:00:00.500Z"
    assert "originalTimestamp" not in event.payload


def test_received_at_is_the_row_time_whatever_the_message_says() -> None:
    event = only_event(stored(track(receivedAt="1999-01-01T00:00:00Z"), "track", received_at_ms=1_700_000_000_007))

    assert event.payload["receivedAt"] == "2023-11-14T22:13:20.007Z"


def test_every_time_is_iso_8601_utc_with_milliseconds_and_z() -> None:
    event = only_event(stored(track(timestamp="2026-11-26T09:00:00+05:45", sentAt="2026-11-26 03:15:07.123456"),
                              "track"))

    times = {key: event.payload[key] for key in ("timestamp", "originalTimestamp", "sentAt", "receivedAt")}
    assert all(ISO_MS_Z.match(value) for value in times.values()), times
    assert times["originalTimestamp"] == "2026-11-26T03:15:00.000Z"
    assert times["sentAt"] == "2026-11-26T03:15:07.123Z"


def test_years_before_1000_keep_four_digits() -> None:
    event = only_event(stored(track(timestamp="0999-01-02T03:04:05.006Z"), "track"))

    assert event.payload["originalTimestamp"] == "0999-01-02T03:04:05.006Z"
    assert event.payload["timestamp"] == "0999-01-02T03:04:05.006Z"


def test_iso_ms_converts_other_zones_to_utc_and_truncates_to_milliseconds() -> None:
    plus_two = timezone(timedelta(hours=2))

    assert iso_ms(datetime(2026, 11, 26, 12, 0, 0, 999999, tzinfo=plus_two)) == "2026-11-26T10:00:00.999Z"
    assert iso_ms(datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)) == "2026-11-26T10:00:00.000Z"
    assert iso_ms(datetime(999, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)) == "0999-01-02T03:04:05.006Z"


def test_messages_sharing_a_batch_sent_at_each_get_their_own_corrected_timestamp() -> None:
    body = {"batch": [track(timestamp="2026-11-26T09:59:00.000Z"), track(timestamp="2026-11-26T09:59:30.000Z")],
            "sentAt": "2026-11-26T10:00:00.000Z"}

    events = run(stored(body)).events

    assert [e.payload["timestamp"] for e in events] == ["2026-11-26T09:59:00.500Z", "2026-11-26T09:59:30.500Z"]
    assert [e.payload["sentAt"] for e in events] == ["2026-11-26T10:00:00.000Z"] * 2


def test_a_timestamp_out_of_range_once_in_utc_is_refused_not_raised() -> None:
    body = {"batch": [track(timestamp="0001-01-01T00:00:00+02:00"), track()]}

    expansion = run(stored(body))

    assert len(expansion.events) == 1
    assert [(r.index, r.problem.code) for r in expansion.refused] == [(0, "invalid_timestamp")]


def reference_times(received_at_ms: int, timestamp: str | None, sent_at: str | None) -> dict[str, str]:
    """The four times the slow, obvious way: datetimes throughout."""
    received = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=received_at_ms)
    times = {"receivedAt": iso_ms(received)}
    original = parse_timestamp(timestamp) if timestamp else None
    sent = parse_timestamp(sent_at) if sent_at else None
    if sent is not None:
        times["sentAt"] = iso_ms(sent)
    if original is None:
        times["timestamp"] = times["receivedAt"]
        return times
    times["originalTimestamp"] = iso_ms(original)
    try:
        times["timestamp"] = iso_ms(received - (sent - original)) if sent is not None else iso_ms(original)
    except OverflowError:
        times["timestamp"] = iso_ms(original)
    return times


def test_times_in_integer_microseconds_agree_with_datetime_arithmetic() -> None:
    """Times works in integer microseconds and formats each second once; datetimes give the
    same strings, to the truncated millisecond, across offsets, sub-millisecond parts, years
    before 1970 and 1000, and corrections that leave datetime's range on either side."""
    rng = random.Random(20261128)
    edges = ["0001-01-01T00:00:00.000Z", "0001-01-01T00:00:00.0005+00:00", "9999-12-31T23:59:59.999999Z",
             "1969-12-31T23:59:59.9995Z", "1970-01-01T00:00:00.0004Z", "0999-01-02T03:04:05.006Z",
             "2026-11-26T12:00:00.25+02:00", "2026-11-26 03:15:07.123456", "2026-11-26T09:00:00+05:45"]

    def random_time() -> str:
        moment = datetime(1, 1, 1) + timedelta(microseconds=rng.randrange(0, 315_537_897_599_999_999))
        offset = timedelta(minutes=rng.choice([0, 0, 90, -345, 840, -720]))
        try:
            return (moment.replace(tzinfo=timezone.utc) + offset).replace(tzinfo=timezone(offset)).isoformat()
        except OverflowError:
            return moment.isoformat()

    # One Times per receive time, as per request: its per-second and per-string caches are then
    # shared by many messages, as they are by a batch's.
    clocks: dict[int, Times] = {}
    for _ in range(20_000):
        received_at_ms = rng.choice([1_764_151_200_500, 0, -1, 1_000, 253_402_300_799_999,
                                     rng.randrange(-62_135_596_800_000, 253_402_300_799_999)])
        timestamp = rng.choice([None, rng.choice(edges), random_time(), random_time()])
        sent_at = rng.choice([None, rng.choice(edges), random_time(), timestamp])
        message = {key: value for key, value in (("timestamp", timestamp), ("sentAt", sent_at)) if value}
        times = clocks.setdefault(received_at_ms, Times(received_at_ms))
        assert times.of(message, {}) == reference_times(received_at_ms, timestamp, sent_at), message


def test_context_ip_comes_from_the_request_address_when_the_message_has_none() -> None:
    added = only_event(stored(track(), "track", remote_addr="198.51.100.4"))
    kept = only_event(stored(track(context={"ip": "192.0.2.1"}), "track", remote_addr="198.51.100.4"))
    off = only_event(stored(track(), "track", remote_addr="198.51.100.4"), add_context_ip=False)
    unknown = only_event(stored(track(), "track", remote_addr=None))

    assert added.payload["context"] == {"ip": "198.51.100.4"}
    assert kept.payload["context"] == {"ip": "192.0.2.1"}
    assert off.payload["context"] == {}
    assert unknown.payload["context"] == {}


CHROME = "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0"


def test_a_pixel_event_without_a_user_agent_gets_the_requests() -> None:
    added = only_event(stored(track(), "pixel/track", user_agent=CHROME, remote_addr=None))
    kept = only_event(stored(track(context={"userAgent": "mine"}), "pixel/track", user_agent=CHROME, remote_addr=None))
    # An SDK's request carries the SDK's own User-Agent (analytics-python/2.4), not the user's.
    posted = only_event(stored(track(), "track", user_agent="analytics-python/2.4.0", remote_addr=None))

    assert added.payload["context"] == {"userAgent": CHROME}
    assert kept.payload["context"] == {"userAgent": "mine"}
    assert posted.payload["context"] == {}


def test_event_name_becomes_event() -> None:
    message = {"type": "track", "eventName": "Order Completed", "userId": "u1"}

    event = only_event(stored(message, "track"))

    assert (event.event_name, event.payload["event"]) == ("Order Completed", "Order Completed")
    assert "eventName" not in event.payload


def test_unknown_keys_are_kept() -> None:
    event = only_event(stored(track(custom={"nested": [1, 2]}, version=2, channel="server"), "track"))

    assert (event.payload["custom"], event.payload["version"], event.payload["channel"]) == (
        {"nested": [1, 2]}, 2, "server")


def test_invalid_items_of_a_batch_are_refused_with_their_index_and_the_rest_are_events() -> None:
    body = {"batch": [
        track(messageId="ok-0"),
        {"type": "track", "userId": "u1"},
        {"type": "identify", "userId": "u2", "messageId": "ok-2"},
        {"type": "nonsense", "userId": "u1"},
        "not an object",
        track(messageId="ok-5", timestamp="yesterday"),
        {"type": "page", "anonymousId": "a1", "messageId": "ok-6"},
    ]}

    expansion = run(stored(body))

    assert [(e.message_id, e.type) for e in expansion.events] == [("ok-0", "track"), ("ok-2", "identify"),
                                                                  ("ok-6", "page")]
    assert [(r.index, r.problem.code) for r in expansion.refused] == [
        (1, "missing_event"), (3, "invalid_type"), (4, "invalid_message"), (5, "invalid_timestamp")]
    assert orjson.loads(expansion.refused[0].raw) == {"type": "track", "userId": "u1"}


def test_a_body_that_cannot_be_opened_is_refused_whole_without_an_index() -> None:
    expansion = run(stored(b"{not json", "batch"))

    assert expansion.events == []
    assert [(r.index, r.problem.code, r.raw) for r in expansion.refused] == [(None, "invalid_json", b"{not json")]


def test_a_pixel_route_gives_its_type() -> None:
    event = only_event(stored({"anonymousId": "a1", "properties": {"path": "/home"}}, "pixel/page"))

    assert (event.type, event.payload["type"], event.event_name) == ("page", "page", None)
