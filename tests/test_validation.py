"""The pure validation rules: validate_message, open_envelope and judge, without a server."""

from __future__ import annotations

import copy
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from pipeline.config import SourceConfig
from pipeline.envelope import BATCH, SINGLE, WEBHOOK, Envelope, Refused, Verdict, judge, open_envelope
from pipeline.messages import (INVALID_WRITE_KEY, OBJECT_FIELDS, TIMESTAMP_FIELDS, Problem, _plainly_valid,
                               first_problem, parse_timestamp, validate_message)
from pipeline.sources import SourceRegistry

TRACK = {"type": "track", "userId": "u1", "event": "Signed Up"}


def code_of(message: Any, route_type: str | None = None) -> str | None:
    problem = validate_message(message, route_type)
    return None if problem is None else problem.code


def with_(**changes: Any) -> dict[str, Any]:
    """TRACK with keys changed; a value of ... removes the key."""
    message = {**TRACK, **changes}
    return {k: v for k, v in message.items() if v is not ...}


# --- type ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "route_type", "code"), [
    (TRACK, None, None),
    (TRACK, "track", None),
    (with_(type=...), "track", None),              # the route gives the type
    (with_(type=...), None, "missing_type"),
    (with_(type=None), None, "missing_type"),
    (with_(type="click"), None, "invalid_type"),
    (with_(type=["track"]), None, "invalid_type"),
    (with_(type="track"), "page", "type_mismatch"),
    (with_(type="Track"), None, "invalid_type"),
    ("track", None, "invalid_message"),
    ([TRACK], None, "invalid_message"),
    (None, "track", "invalid_message"),
])
def test_type_rules(message: Any, route_type: str | None, code: str | None) -> None:
    assert code_of(message, route_type) == code


def test_type_mismatch_says_which_type_went_where() -> None:
    assert validate_message({"type": "identify", "userId": "u1"}, "track") == Problem(
        "type_mismatch", "Type does not match the endpoint", "an identify message was sent to the track endpoint")


@pytest.mark.parametrize("kind", ["identify", "track", "page", "screen", "group", "alias"])
def test_each_type_has_a_minimal_valid_message(kind: str) -> None:
    extra = {"track": {"event": "e"}, "group": {"groupId": "g"}, "alias": {"previousId": "p"}}.get(kind, {})
    assert validate_message({"type": kind, "anonymousId": "a", **extra}) is None


# --- identity ------------------------------------------------------------------------------

@pytest.mark.parametrize(("ids", "code"), [
    ({"userId": "u1"}, None),
    ({"anonymousId": "a1"}, None),
    ({"userId": 42}, None),                          # numbers are kept as sent
    ({"userId": 0}, None),
    ({"anonymousId": 4.5}, None),
    ({"userId": "u1", "anonymousId": None}, None),   # analytics-python sends "anonymousId": null
    ({"userId": "", "anonymousId": "a1"}, None),
    ({}, "missing_user_id"),
    ({"userId": None, "anonymousId": None}, "missing_user_id"),
    ({"userId": "", "anonymousId": ""}, "missing_user_id"),
    ({"userId": True}, "invalid_user_id"),
    ({"userId": False, "anonymousId": "a1"}, "invalid_user_id"),
    ({"anonymousId": {"id": "a1"}}, "invalid_user_id"),
    ({"userId": "u1", "anonymousId": ["a1"]}, "invalid_user_id"),
])
def test_user_id_or_anonymous_id_rules(ids: dict[str, Any], code: str | None) -> None:
    assert code_of({"type": "identify", **ids}) == code


def test_missing_user_id_problem() -> None:
    assert validate_message({"type": "page"}) == Problem(
        "missing_user_id", "Missing userId or anonymousId", "a userId or an anonymousId is required")


@pytest.mark.parametrize(("fields", "code"), [
    ({"previousId": "p1", "userId": "u1"}, None),
    ({"previousId": 7, "anonymousId": "a1"}, None),
    ({"userId": "u1"}, "missing_previous_id"),
    ({"previousId": None, "userId": "u1"}, "missing_previous_id"),
    ({"previousId": "", "userId": "u1"}, "missing_previous_id"),
    ({"previousId": True, "userId": "u1"}, "invalid_previous_id"),
    ({"previousId": {}, "userId": "u1"}, "invalid_previous_id"),
    ({"previousId": "p1"}, "missing_user_id"),
])
def test_alias_needs_previous_id_and_a_user(fields: dict[str, Any], code: str | None) -> None:
    assert code_of({"type": "alias", **fields}) == code


@pytest.mark.parametrize(("fields", "code"), [
    ({"event": "Signed Up"}, None),
    ({"eventName": "Signed Up"}, None),             # the spec's name for it
    ({}, "missing_event"),
    ({"event": None}, "missing_event"),
    ({"event": ""}, "missing_event"),
    ({"event": 3}, "invalid_event"),
    ({"eventName": {"name": "x"}}, "invalid_event"),
])
def test_track_needs_event_or_event_name(fields: dict[str, Any], code: str | None) -> None:
    assert code_of({"type": "track", "userId": "u1", **fields}) == code


@pytest.mark.parametrize(("fields", "code"), [
    ({"groupId": "g1"}, None),
    ({"groupId": 12}, None),
    ({}, "missing_group_id"),
    ({"groupId": ""}, "missing_group_id"),
    ({"groupId": None}, "missing_group_id"),
    ({"groupId": False}, "invalid_group_id"),
    ({"groupId": ["g1"]}, "invalid_group_id"),
])
def test_group_needs_group_id(fields: dict[str, Any], code: str | None) -> None:
    assert code_of({"type": "group", "userId": "u1", **fields}) == code


# --- fields --------------------------------------------------------------------------------

@pytest.mark.parametrize(("message_id", "code"), [
    ("m1", None), ("x" * 100, None), (None, None),
    ("x" * 101, "invalid_message_id"), (12345, "invalid_message_id"), ({"id": "m"}, "invalid_message_id"),
])
def test_message_id_is_a_string_of_at_most_100(message_id: Any, code: str | None) -> None:
    assert code_of(with_(messageId=message_id)) == code


@pytest.mark.parametrize("field", ["timestamp", "sentAt", "originalTimestamp"])
@pytest.mark.parametrize(("value", "code"), [
    ("2015-11-10T00:45:23.412Z", None),
    ("2015-11-10T00:45:23.412+02:00", None),
    ("2015-11-10T00:45:23", None),
    ("2015-11-10", None),
    (None, None),
    (1447116323, "invalid_timestamp"),
    (1447116323.412, "invalid_timestamp"),
    ("yesterday", "invalid_timestamp"),
    ("2015-13-45T00:00:00Z", "invalid_timestamp"),
    ({"date": "2015-11-10"}, "invalid_timestamp"),
])
def test_timestamps_are_iso_8601_strings(field: str, value: Any, code: str | None) -> None:
    assert code_of(with_(**{field: value})) == code


def test_invalid_timestamp_problem_names_the_field() -> None:
    assert validate_message(with_(sentAt=12)) == Problem(
        "invalid_timestamp", "Invalid sentAt", "sentAt must be an ISO-8601 date string, got 12")


@pytest.mark.parametrize(("text", "expected"), [
    ("2015-11-10T00:45:23.412Z", datetime(2015, 11, 10, 0, 45, 23, 412000, tzinfo=timezone.utc)),
    ("2015-11-10T00:45:23", datetime(2015, 11, 10, 0, 45, 23, tzinfo=timezone.utc)),  # no offset: UTC
    ("2015-11-10T00:45:23+02:00", datetime(2015, 11, 9, 22, 45, 23, tzinfo=timezone.utc)),
])
def test_parse_timestamp_gives_utc(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("field", ["context", "integrations", "properties", "traits"])
@pytest.mark.parametrize(("value", "ok"), [({}, True), ({"a": 1}, True), (None, True),
                                           ([], False), ("x", False), (1, False), (True, False)])
def test_context_integrations_properties_traits_are_objects(field: str, value: Any, ok: bool) -> None:
    expected = None if ok else Problem(f"invalid_{field}", f"Invalid {field}", f"{field} must be a JSON object")
    assert validate_message(with_(**{field: value})) == expected


@pytest.mark.parametrize(("key", "code"), [("k", None), (None, None), (5, "invalid_write_key")])
def test_message_write_key_is_a_string(key: Any, code: str | None) -> None:
    assert code_of(with_(writeKey=key)) == code


def test_unknown_keys_are_accepted_and_left_as_they_are() -> None:
    message = with_(_metadata={"bundled": ["x"]}, channel="server", custom=[1, 2], version=2)
    before = copy.deepcopy(message)
    assert validate_message(message) is None
    assert message == before


# --- open_envelope -------------------------------------------------------------------------

def refusal(body: bytes, kind: str) -> Problem:
    with pytest.raises(Refused) as caught:
        open_envelope(body, kind)
    return caught.value.problem


def test_single_body_is_one_item_kept_whole() -> None:
    body = b'{"type": "track", "userId": "u1", "event": "e", "_metadata": {"x": 1}, "channel": "web"}'
    assert open_envelope(body, SINGLE) == Envelope(
        is_batch=False, items=[{"type": "track", "userId": "u1", "event": "e", "_metadata": {"x": 1},
                                "channel": "web"}])


def test_single_route_does_not_unpack_a_batch_key() -> None:
    assert open_envelope(b'{"batch": [1]}', SINGLE) == Envelope(is_batch=False, items=[{"batch": [1]}])


def test_batch_body_gives_its_items_and_batch_fields() -> None:
    envelope = open_envelope(b'{"batch": [{"a": 1}, 2], "writeKey": "k", "context": {"ip": "1.2.3.4"}}', BATCH)
    assert (envelope.is_batch, envelope.items, envelope.batch_key) == (True, [{"a": 1}, 2], "k")
    assert envelope.batch["context"] == {"ip": "1.2.3.4"}


@pytest.mark.parametrize(("body", "is_batch"), [(b'{"type": "track"}', False), (b'{"batch": [{}]}', True)])
def test_webhook_body_is_a_message_or_a_batch(body: bytes, is_batch: bool) -> None:
    assert open_envelope(body, WEBHOOK).is_batch is is_batch


@pytest.mark.parametrize("key", [None, ""])
def test_batch_key_absent_or_empty_is_none(key: str | None) -> None:
    assert open_envelope(b'{"batch": [{}], "writeKey": %s}' % (b"null" if key is None else b'""'), BATCH) \
        .batch_key is None


@pytest.mark.parametrize(("body", "kind", "code", "message", "details"), [
    (b'[{"type": "track"}]', SINGLE, "invalid_body", "Body must be a JSON object", "got list"),
    (b'"track"', BATCH, "invalid_body", "Body must be a JSON object", "got str"),
    (b'null', WEBHOOK, "invalid_body", "Body must be a JSON object", "got NoneType"),
    (b'{}', BATCH, "invalid_batch", "Missing batch", "batch must be an array of messages"),
    (b'{"batch": {"type": "track"}}', BATCH, "invalid_batch", "Missing batch", "batch must be an array of messages"),
    (b'{"batch": null}', WEBHOOK, "invalid_batch", "Missing batch", "batch must be an array of messages"),
    (b'{"batch": []}', BATCH, "empty_batch", "Empty batch", "batch holds no messages"),
    (b'{"batch": [{}], "context": []}', BATCH, "invalid_context", "Invalid context", "context must be a JSON object"),
    (b'{"batch": [{}], "integrations": "all"}', BATCH, "invalid_integrations", "Invalid integrations",
     "integrations must be a JSON object"),
    (b'{"batch": [{}], "sentAt": 5}', BATCH, "invalid_timestamp", "Invalid sentAt",
     "sentAt must be an ISO-8601 date string, got 5"),
    (b'{"batch": [{}], "writeKey": 5}', BATCH, "invalid_write_key", INVALID_WRITE_KEY, "writeKey must be a string"),
])
def test_open_envelope_refusals(body: bytes, kind: str, code: str, message: str, details: str) -> None:
    assert refusal(body, kind) == Problem(code, message, details)


@pytest.mark.parametrize("body", [b'', b'{', b'{"type": track}', b'{"a": True}', b'{"a": 1,}', b"\xff\xfe"])
@pytest.mark.parametrize("kind", [SINGLE, BATCH, WEBHOOK])
def test_bad_json_is_invalid_json(body: bytes, kind: str) -> None:
    problem = refusal(body, kind)
    assert (problem.code, problem.message, problem.status, problem.error) == \
        ("invalid_json", "Invalid JSON", 400, "Bad Request")
    assert problem.details


# --- judge ---------------------------------------------------------------------------------

OPEN = SourceRegistry([]).source_for
CLOSED = SourceRegistry([SourceConfig("web", ("kw",)), SourceConfig("app", ("ka",))]).source_for
NO_KEY = Problem("invalid_write_key", INVALID_WRITE_KEY)


def run_judge(items: list[Any], *, source_for: Any = OPEN, batch_key: str | None = None,
              override_key: str | None = None, auth_key: str | None = None, route_type: str | None = None,
              max_message_bytes: int = 15360, body_size: int = 100, is_batch: bool = True) -> list[Verdict]:
    batch = {"batch": items, "writeKey": batch_key} if batch_key else {}
    return judge(Envelope(is_batch=is_batch, items=items, batch=batch), route_type=route_type,
                 override_key=override_key, auth_key=auth_key, source_for=source_for,
                 max_message_bytes=max_message_bytes, body_size=body_size)


def test_judge_gives_one_verdict_per_item_in_order() -> None:
    verdicts = run_judge([TRACK, with_(userId=...), "x", TRACK])
    # A refused message keeps the source its key names (refusals are counted per source).
    assert [(v.index, v.problem.code if v.problem else None, v.source) for v in verdicts] == [
        (0, None, "default"), (1, "missing_user_id", "default"), (2, "invalid_message", "default"),
        (3, None, "default")]


def test_a_refused_message_with_an_unknown_key_has_no_source() -> None:
    [verdict] = run_judge([with_(userId=..., writeKey="nope")], source_for=CLOSED)
    assert verdict.problem is not None and verdict.problem.code == "missing_user_id" and verdict.source is None


def test_judge_fills_the_route_type() -> None:
    assert run_judge([with_(type=...)], route_type="track", is_batch=False) == [Verdict(0, None, "default")]


@pytest.mark.parametrize(("own", "batch_key", "auth_key", "override_key", "expected"), [
    ("kw", None, None, None, "web"),
    (None, "ka", None, None, "app"),
    (None, None, "kw", None, "web"),
    ("kw", "ka", "ka", None, "web"),        # the message's own key first
    (None, "kw", "ka", None, "web"),        # then the batch body's, then Basic auth
    ("nope", "kw", "kw", None, None),       # an unknown own key is not rescued by the others
    ("kw", "kw", "kw", "ka", "app"),        # the webhook ?writeKey= overrides everything
    ("kw", None, None, "nope", None),
    (None, None, None, None, None),
])
def test_judge_resolves_each_message_write_key(own: str | None, batch_key: str | None, auth_key: str | None,
                                               override_key: str | None, expected: str | None) -> None:
    message = with_(writeKey=own if own is not None else ...)
    [verdict] = run_judge([message], source_for=CLOSED, batch_key=batch_key, auth_key=auth_key,
                          override_key=override_key)
    assert verdict == Verdict(0, None if expected else NO_KEY, expected)


def test_judge_resolves_keys_per_message() -> None:
    verdicts = run_judge([with_(writeKey="ka"), with_(writeKey="bad"), TRACK], source_for=CLOSED, batch_key="kw")
    assert verdicts == [Verdict(0, None, "app"), Verdict(1, NO_KEY, None), Verdict(2, None, "web")]


def test_open_mode_accepts_any_key_or_none_as_default() -> None:
    verdicts = run_judge([with_(writeKey="anything"), TRACK])
    assert verdicts == [Verdict(0, None, "default"), Verdict(1, None, "default")]


def test_judge_refuses_a_batch_item_over_the_message_limit() -> None:
    big = with_(properties={"blob": "x" * 200})
    verdicts = run_judge([TRACK, big], max_message_bytes=150, body_size=400)
    size = len(b'{"type":"track","userId":"u1","event":"Signed Up","properties":{"blob":"' + b"x" * 200 + b'"}}')
    assert verdicts == [Verdict(0, None, "default"), Verdict(1, Problem(
        "message_too_large", "Message too large", f"message is {size} bytes, the limit is 150", status=413),
        "default")]


def test_judge_does_not_measure_a_single_message() -> None:
    big = with_(properties={"blob": "x" * 200})
    assert run_judge([big], max_message_bytes=150, body_size=400, is_batch=False) == [Verdict(0, None, "default")]


def test_invalid_message_is_judged_before_its_key() -> None:
    [verdict] = run_judge([with_(userId=...)], source_for=CLOSED)
    assert verdict.problem is not None and verdict.problem.code == "missing_user_id"


def test_empty_event_falls_back_to_event_name() -> None:
    assert validate_message({"type": "track", "userId": "u", "event": "", "eventName": "Signed Up"}) is None


# --- the fast path agrees with the rules ------------------------------------------------------

def test_the_fast_path_never_accepts_what_the_rules_refuse() -> None:
    """validate_message first tries a one-pass acceptance of the common shapes, and asks the
    rules one by one only when in doubt. Tens of thousands of messages, each a valid one with a
    few fields changed to values from the edges of every rule, must get the same verdict as
    from the rules alone; and the fast path must accept plenty of them, or it saves nothing."""
    rng = random.Random(20261128)
    bases = [TRACK, {"type": "identify", "anonymousId": "a1"}, {"type": "alias", "userId": "u", "previousId": "p"},
             {"type": "group", "userId": "u", "groupId": "g"}, {"type": "page", "userId": 7},
             {"type": "screen", "anonymousId": "a", "name": "Home"}]
    fields = ["type", "userId", "anonymousId", "event", "eventName", "previousId", "groupId", "messageId",
              *TIMESTAMP_FIELDS, *OBJECT_FIELDS, "writeKey"]
    values = [..., None, "", "x", 0, 7, 1.5, -0.0, True, False, [], ["track"], {}, {"a": 1}, "track", "alias",
              "group", "page", "Track", "a" * 100, "a" * 101, "a\x00b", "2024-05-01T12:00:00.000Z",
              "2024-05-01T12:00:00", "2024-05-01T12:00:00+05:30", "2024-05-01", "0001-01-01T00:00:00+02:00",
              "0001-01-01T03:00:00+02:00", "9999-12-31T23:59:59-01:00", "9999-12-31T20:00:00-01:00",
              "not a time", "2024-13-01T00:00:00Z", 1714564800]
    accepted = 0
    for _ in range(30_000):
        message = dict(rng.choice(bases))
        for field in rng.sample(fields, rng.randint(0, 3)):
            value = rng.choice(values)
            if value is ...:
                message.pop(field, None)
            else:
                message[field] = value
        route_type = rng.choice([None, None, "track", "page", "alias"])
        expected = first_problem(message, route_type)
        assert validate_message(message, route_type) == expected, (message, route_type)
        accepted += expected is None and _plainly_valid(message, route_type)
    assert accepted > 3_000
