"""Every route and alias of the HTTP Tracking API: what it answers and what it stores."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RunningReceiver

SUCCESS = {"Success": True}

# One valid message per type, without "type": the tests add it or leave it to the route.
VALID = {
    "identify": {"userId": "u1", "traits": {"name": "Arthur Dent"}},
    "track": {"userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"}},
    "page": {"anonymousId": "a1", "name": "Home"},
    "screen": {"userId": "u1", "name": "Main"},
    "group": {"userId": "u1", "groupId": "g1"},
    "alias": {"userId": "u1", "previousId": "a1"},
}
SINGLE_PATHS = [(kind, f"/v1/{path}") for kind, short in
                [("identify", "i"), ("track", "t"), ("page", "p"), ("screen", "s"), ("group", "g"),
                 ("alias", "a")] for path in (kind, short)]
BATCH_PATHS = ["/v1/batch", "/v1/import", "/v1/b"]
WEBHOOK_PATHS = ["/v1/webhook", "/v1/w"]

TRACK = {"type": "track", **VALID["track"]}
NO_USER = {"type": "track", "event": "Signed Up"}
NO_USER_ITEM = {"Error": "Bad Request", "Message": "Missing userId or anonymousId",
                "Details": "a userId or an anonymousId is required", "code": "missing_user_id"}

# The spec's examples, verbatim. The single-message ones are not JSON (True, missing commas,
# bare identifiers); the batch and pixel payloads are.
SPEC_IDENTIFY = """{
  "userId": "1234qwerty",
  "traits": {
    "name": "Arthur Dent",
    "email": "earthling1@hitchhikersguide.com",
    "hasTowel": True,
  }
  "timestamp": "2015-11-10T00:45:23.412Z",
  "type": identify
}
"""
SPEC_TRACK = """{
  "userId": "1234qwerty",
  "event": "Added File",
  "properties": {
    "fileTitle": "Life, the Universe, and Everything",
    "fileSize": "42kb",
    "fileType": "PDF"
  },
  "timestamp": "2015-11-10T00:45:23.412Z"
  "type": track
}
"""
SPEC_PAGE = """{
  "userId": "1234qwerty",
  "section": "Blog",
  "name": "10 Questions with Marvin, the clinically depressed robot",
  "properties": {
    "referrer": "http://reddit.com/r/AMA"
  }
  "type": page
}
"""
SPEC_GROUP = """{
  "userId": "1234qwerty",
  "groupId": "5678dvorak",
  "traits": {
    "name": "The Hitchhikers",
    "relativePosition": "[39.1000 N, 84.5167 W]"
    }
  "type": group
}
"""
SPEC_ALIAS = """{
  "previousId": "anonymous_id",
  "userId": "assigned_id_or_email",
  "timestamp": "2015-11-10T00:45:23.412Z"
  "type": alias
}
"""
SPEC_BATCH = """{
  "batch": [
    {
      "anonymousId": "cf09e649-fd0b-46b6-9fc1-53ab9cd05c47",
      "messageId": "317b11a8-8cd3-40ad-b3fb-622835c42cfd",
      "sentAt": "2020-03-02T18:29:53.661Z",
      "timestamp": "2020-03-02T18:29:27.333Z",
      "type": "track",
      "writeKey": "test1",
      "event": "example 1 event"
    },
    {
      "anonymousId": "cf09e649-fd0b-46b6-9fc1-53ab9cd05c47",
      "messageId": "317b11a8-8cd3-40ad-b3fb-123d417b11a8",
      "sentAt": "2020-03-02T18:29:53.661Z",
      "timestamp": "2020-03-02T18:29:27.333Z",
      "type": "track",
      "writeKey": "test1",
      "event": "example 1 event"
    }
  ],
  "context": {
    "page": {
      "path": "/mycart/home",
      "referrer": "https://www.example.com/",
      "title": "Example - Shopping Cart",
      "url": "https://www.example.com/mycart/home"
    },
    "userAgent": "Mozilla/5.0 (Windows NT 6.1; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/80.0.3987.122 Safari/537.36"
  },
  "integrations": {
    "All": false,
    "Mixpanel": true
  }
}
"""
SPEC_PIXEL_TRACK = """{
  "integrations": {},
  "context": {
    "page": {
      "path": "/home"
    },
    "library": {
      "name": "analytics.js",
      "version": "3.2.21"
    }
  },
  "event": "example event",
  "messageId": "1234567890",
  "type": "track",
  "writeKey": "example",
  "userId": "0987654321"
}
"""


def as_sent(message: dict[str, Any]) -> bytes:
    """Indented JSON with a trailing newline: a body that re-serialising would change."""
    return json.dumps(message, indent=3).encode() + b"\n"


def single_error(code: str, message: str, details: str, error: str = "Bad Request") -> dict[str, Any]:
    return {"Error": error, "Message": message, "Details": details, "code": code, "message": message}


def batch_error(code: str, message: str, details: str) -> dict[str, Any]:
    return {"Success": False, "Errors": [{"Error": "Bad Request", "Message": message, "Details": details,
                                          "code": code}],
            "code": code, "message": message}


def assert_only_rejected(receiver: RunningReceiver, route: str, status: int, code: str, reason: str,
                         raw: bytes | None) -> None:
    assert receiver.outbox() == []
    [row] = receiver.rejected()
    assert (row["route"], row["status"], row["code"], row["reason"], row["raw"]) == \
        (route, status, code, reason, raw)
    assert row["source"] is None and row["remote_addr"] == "127.0.0.1" and row["received_at_ms"] > 0


def stored(receiver: RunningReceiver) -> list[tuple[str, str, bytes]]:
    """The outbox as (route, source, body); the rejected table must be empty."""
    assert receiver.rejected() == []
    return [(r["route"], r["source"], bytes(r["body"])) for r in receiver.outbox()]


# --- single-message routes -----------------------------------------------------------------

@pytest.mark.parametrize(("kind", "path"), SINGLE_PATHS)
def test_single_route_stores_the_body_as_sent_under_its_type(receiver: RunningReceiver, kind: str,
                                                             path: str) -> None:
    body = as_sent({"type": kind, **VALID[kind]})
    response = receiver.post(path, body, headers={"User-Agent": "probe/1.0"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    [row] = receiver.outbox()
    assert {k: row[k] for k in ("route", "source", "remote_addr", "user_agent", "auth_key",
                                "override_key", "state")} == \
        {"route": kind, "source": "default", "remote_addr": "127.0.0.1", "user_agent": "probe/1.0",
         "auth_key": None, "override_key": None, "state": "pending"}
    assert bytes(row["body"]) == body
    assert row["received_at_ms"] > 1_600_000_000_000
    assert receiver.rejected() == []


@pytest.mark.parametrize("path", ["/v1/screen", "/v1/t"])
def test_route_gives_the_type_when_the_body_has_none(receiver: RunningReceiver, path: str) -> None:
    kind = "screen" if path == "/v1/screen" else "track"
    body = as_sent(VALID[kind])
    response = receiver.post(path, body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(receiver) == [(kind, "default", body)]


def test_body_type_contradicting_the_route_is_refused(receiver: RunningReceiver) -> None:
    body = as_sent({"type": "identify", "userId": "u1"})
    response = receiver.post("/v1/t", body)
    details = "an identify message was sent to the track endpoint"
    assert (response.status_code, response.json()) == \
        (400, single_error("type_mismatch", "Type does not match the endpoint", details))
    assert_only_rejected(receiver, "track", 400, "type_mismatch",
                         f"Type does not match the endpoint: {details}", body)


def test_invalid_single_message_is_refused_in_the_single_format(receiver: RunningReceiver) -> None:
    body = as_sent(NO_USER)
    response = receiver.post("/v1/track", body)
    assert (response.status_code, response.json()) == \
        (400, single_error("missing_user_id", NO_USER_ITEM["Message"], NO_USER_ITEM["Details"]))
    assert_only_rejected(receiver, "track", 400, "missing_user_id",
                         f"{NO_USER_ITEM['Message']}: {NO_USER_ITEM['Details']}", body)


def test_bad_json_on_a_single_route_is_invalid_json(receiver: RunningReceiver) -> None:
    body = b'{"type": "track", "userId": "u1",'
    response = receiver.post("/v1/track", body)
    answer = response.json()
    assert response.status_code == 400
    details = answer.pop("Details")  # the parser's words
    assert isinstance(details, str) and details
    assert answer == {"Error": "Bad Request", "Message": "Invalid JSON", "code": "invalid_json",
                      "message": "Invalid JSON"}
    assert_only_rejected(receiver, "track", 400, "invalid_json", f"Invalid JSON: {details}", body)


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
def test_json_array_body_is_refused(receiver: RunningReceiver, path: str) -> None:
    body = b'[{"type": "track", "userId": "u1", "event": "Signed Up"}]'
    response = receiver.post(path, body)
    error = ("invalid_body", "Body must be a JSON object", "got list")
    expected = single_error(*error) if path == "/v1/track" else batch_error(*error)
    assert (response.status_code, response.json()) == (400, expected)
    route = path.removeprefix("/v1/")
    assert_only_rejected(receiver, route, 400, "invalid_body", "Body must be a JSON object: got list", body)


def deep_track(depth: int = 300) -> bytes:
    """A track message whose properties nest ``depth`` levels: orjson reads up to 1024 levels
    but writes only 255, so such a message could never be stored as an event."""
    nested = b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    return b'{"type":"track","event":"x","userId":"u1","properties":' + nested + b"}"


TOO_DEEP = ("nesting_too_deep", "Message nested too deeply", "JSON nested more than 255 levels deep cannot be stored")


def test_a_message_nested_too_deep_to_store_is_refused_with_a_400(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/track", deep_track())
    assert (response.status_code, response.json()) == (400, single_error(*TOO_DEEP))
    assert_only_rejected(receiver, "track", 400, "nesting_too_deep", f"{TOO_DEEP[1]}: {TOO_DEEP[2]}", deep_track())


# Bodies over the message limit (15 KB) have each message measured, which writes it too.
@pytest.mark.parametrize("filler", [0, 10_000], ids=["small-batch", "batch-over-the-message-limit"])
def test_a_batch_item_nested_too_deep_is_refused_on_its_own(receiver: RunningReceiver, filler: int) -> None:
    good = json.dumps({**TRACK, "properties": {"blob": "x" * filler}}).encode()
    body = b'{"batch":[' + deep_track() + b"," + good + b"," + good + b"]}"
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == (207, {
        "Success": False,
        "Errors": [{"Error": "Bad Request", "Message": TOO_DEEP[1], "Details": TOO_DEEP[2], "Index": 0,
                    "code": TOO_DEEP[0]}],
        "code": "partial_success", "message": "1 of 3 messages were rejected"})
    assert stored(receiver) == [("batch", "default", body)]


@pytest.mark.parametrize("filler", [0, 9_000], ids=["small-batch", "batch-over-the-message-limit"])
def test_a_batch_context_too_deep_refuses_every_item_it_would_be_merged_into(receiver: RunningReceiver,
                                                                              filler: int) -> None:
    """Every item is checked with the batch's context merged in, whether the body is small
    (one write of it all finds the depth) or over the message limit (each item is written)."""
    items = [{**TRACK, "properties": {"blob": "x" * filler}}] * 2
    deep_context = b'{"a":' * 259 + b"{}" + b"}" * 259
    body = b'{"context":' + deep_context + b',"batch":' + json.dumps(items).encode() + b"}"
    response = receiver.post("/v1/batch", body)
    assert response.status_code == 400
    assert [(e["Index"], e["code"]) for e in response.json()["Errors"]] == [(0, TOO_DEEP[0]), (1, TOO_DEEP[0])]
    assert receiver.outbox() == []
    assert [(r["status"], r["raw"]) for r in receiver.rejected()] == [(400, body[:2048])]


# --- batch routes --------------------------------------------------------------------------

@pytest.mark.parametrize("path", BATCH_PATHS)
def test_batch_route_stores_one_row_for_the_request(receiver: RunningReceiver, path: str) -> None:
    body = as_sent({"batch": [TRACK, {"type": "identify", **VALID["identify"]}], "writeKey": "k"})
    response = receiver.post(path, body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(receiver) == [("batch", "default", body)]


def test_partial_success_is_207_listing_the_failed_items(receiver: RunningReceiver) -> None:
    body = as_sent({"batch": [TRACK, NO_USER]})
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == (207, {
        "Success": False,
        "Errors": [{"Error": "Bad Request", "Message": "Missing userId or anonymousId",
                    "Details": "a userId or an anonymousId is required", "Index": 1, "code": "missing_user_id"}],
        "code": "partial_success", "message": "1 of 2 messages were rejected"})
    # The request is stored; its failed items are recorded later, by the pipeline.
    assert stored(receiver) == [("batch", "default", body)]


def test_partial_success_status_setting_answers_200_with_the_same_body(start_receiver: Any) -> None:
    receiver = start_receiver(partial_success_status=200)
    body = as_sent({"batch": [NO_USER, TRACK, NO_USER]})
    response = receiver.post("/v1/b", body)
    assert (response.status_code, response.json()) == (200, {
        "Success": False, "Errors": [{**NO_USER_ITEM, "Index": 0}, {**NO_USER_ITEM, "Index": 2}],
        "code": "partial_success", "message": "2 of 3 messages were rejected"})
    assert stored(receiver) == [("batch", "default", body)]


def test_batch_with_every_item_invalid_is_400_and_stores_only_a_rejection(receiver: RunningReceiver) -> None:
    body = as_sent({"batch": [NO_USER, {"type": "track", "userId": "u1"}]})
    response = receiver.post("/v1/import", body)
    assert (response.status_code, response.json()) == (400, {
        "Success": False,
        "Errors": [{**NO_USER_ITEM, "Index": 0},
                   {"Error": "Bad Request", "Message": "Missing event", "Details": "track needs an event name",
                    "Index": 1, "code": "missing_event"}],
        "code": "invalid_messages", "message": "all 2 messages were rejected"})
    assert_only_rejected(receiver, "batch", 400, "invalid_messages", "all 2 messages were rejected", body)


def test_batch_whose_items_share_one_fault_is_refused_with_that_code(receiver: RunningReceiver) -> None:
    body = as_sent({"batch": [NO_USER, NO_USER]})
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == (400, {
        "Success": False, "Errors": [{**NO_USER_ITEM, "Index": 0}, {**NO_USER_ITEM, "Index": 1}],
        "code": "missing_user_id", "message": "Missing userId or anonymousId"})
    assert_only_rejected(receiver, "batch", 400, "missing_user_id",
                         "Missing userId or anonymousId: a userId or an anonymousId is required", body)


def test_empty_batch_is_refused(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/batch", b'{"batch": []}')
    assert (response.status_code, response.json()) == \
        (400, batch_error("empty_batch", "Empty batch", "batch holds no messages"))
    assert_only_rejected(receiver, "batch", 400, "empty_batch", "Empty batch: batch holds no messages",
                         b'{"batch": []}')


@pytest.mark.parametrize("body", [b'{"batch": {"type": "track"}}', b'{"batch": "x"}', b'{"messages": []}'])
def test_batch_that_is_not_a_list_is_refused(receiver: RunningReceiver, body: bytes) -> None:
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == \
        (400, batch_error("invalid_batch", "Missing batch", "batch must be an array of messages"))
    assert_only_rejected(receiver, "batch", 400, "invalid_batch",
                         "Missing batch: batch must be an array of messages", body)


def test_bad_json_on_a_batch_route_is_invalid_json_in_the_batch_format(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/batch", b'{"batch": [}')
    answer = response.json()
    assert response.status_code == 400
    details = answer["Errors"][0].pop("Details")
    assert isinstance(details, str) and details
    assert answer == {"Success": False, "Errors": [{"Error": "Bad Request", "Message": "Invalid JSON",
                                                    "code": "invalid_json"}],
                      "code": "invalid_json", "message": "Invalid JSON"}
    assert_only_rejected(receiver, "batch", 400, "invalid_json", f"Invalid JSON: {details}", b'{"batch": [}')


# --- webhook -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", WEBHOOK_PATHS)
def test_webhook_stores_a_single_message_with_the_query_write_key(receiver: RunningReceiver, path: str) -> None:
    body = as_sent({**TRACK, "writeKey": "in-body"})
    response = receiver.post(f"{path}?writeKey=from-query", body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    [row] = receiver.outbox()
    assert (row["route"], row["source"], bytes(row["body"]), row["override_key"]) == \
        ("webhook", "default", body, "from-query")


def test_webhook_without_a_query_key_stores_no_override(receiver: RunningReceiver) -> None:
    body = as_sent({"batch": [TRACK]})
    response = receiver.post("/v1/w", body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    [row] = receiver.outbox()
    assert (row["route"], bytes(row["body"]), row["override_key"]) == ("webhook", body, None)


def test_webhook_single_message_answers_in_the_single_format(receiver: RunningReceiver) -> None:
    body = as_sent(NO_USER)
    response = receiver.post("/v1/webhook?writeKey=k", body)
    assert (response.status_code, response.json()) == \
        (400, single_error("missing_user_id", NO_USER_ITEM["Message"], NO_USER_ITEM["Details"]))
    assert_only_rejected(receiver, "webhook", 400, "missing_user_id",
                         f"{NO_USER_ITEM['Message']}: {NO_USER_ITEM['Details']}", body)


def test_webhook_batch_answers_in_the_batch_format(receiver: RunningReceiver) -> None:
    body = as_sent({"batch": [NO_USER, TRACK]})
    response = receiver.post("/v1/w?writeKey=k", body)
    assert (response.status_code, response.json()) == (207, {
        "Success": False, "Errors": [{**NO_USER_ITEM, "Index": 0}],
        "code": "partial_success", "message": "1 of 2 messages were rejected"})
    [row] = receiver.outbox()
    assert (row["route"], bytes(row["body"]), row["override_key"]) == ("webhook", body, "k")


# --- the other routes ----------------------------------------------------------------------

def test_metrics_route_answers_200_and_stores_nothing(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/m", {"series": [{"type": "Counter", "metric": "analytics_js.invoke"}]})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert receiver.outbox() == [] and receiver.rejected() == []


def test_health_answers_ok(receiver: RunningReceiver) -> None:
    response = receiver.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize("path", ["/v1/nope", "/v2/track", "/"])
def test_unknown_path_is_a_json_404(receiver: RunningReceiver, path: str) -> None:
    response = receiver.post(path, TRACK)
    assert response.headers["Content-Type"].startswith("application/json")
    assert (response.status_code, response.json()) == \
        (404, single_error("not_found", "Not Found", f"no route {path}", error="Not Found"))
    assert receiver.outbox() == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/track"), ("GET", "/v1/batch"), ("POST", "/health")])
def test_wrong_method_is_a_json_405(receiver: RunningReceiver, method: str, path: str) -> None:
    response = receiver.client.request(method, path)
    assert response.headers["Content-Type"].startswith("application/json")
    assert (response.status_code, response.json()) == \
        (405, single_error("http_405", "Method Not Allowed", "", error="Method Not Allowed"))
    assert receiver.outbox() == [] and receiver.rejected() == []


# --- the spec's own examples ---------------------------------------------------------------

def test_spec_batch_example_is_accepted(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/batch", SPEC_BATCH, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(receiver) == [("batch", "default", SPEC_BATCH.encode())]


def test_spec_pixel_payload_posted_to_track_is_accepted(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/track", SPEC_PIXEL_TRACK, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(receiver) == [("track", "default", SPEC_PIXEL_TRACK.encode())]


@pytest.mark.parametrize(("path", "example"), [
    ("/v1/identify", SPEC_IDENTIFY), ("/v1/track", SPEC_TRACK), ("/v1/page", SPEC_PAGE),
    ("/v1/group", SPEC_GROUP), ("/v1/alias", SPEC_ALIAS)], ids=["identify", "track", "page", "group", "alias"])
def test_spec_malformed_examples_get_a_clear_invalid_json(receiver: RunningReceiver, path: str,
                                                          example: str) -> None:
    response = receiver.post(path, example, headers={"Content-Type": "application/json"})
    answer = response.json()
    assert response.status_code == 400
    details = answer.pop("Details")
    assert "line" in details or "column" in details  # says where the JSON broke
    assert answer == {"Error": "Bad Request", "Message": "Invalid JSON", "code": "invalid_json",
                      "message": "Invalid JSON"}
    assert_only_rejected(receiver, path.removeprefix("/v1/"), 400, "invalid_json", f"Invalid JSON: {details}",
                         example.encode())


def make_judge_fail_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours, injected: the receiver's next judge() raises, the ones after it judge."""
    from receiver import ingest

    real_judge = ingest.judge
    calls: list[int] = []

    def judge_failing_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("injected")
        return real_judge(*args, **kwargs)

    monkeypatch.setattr(ingest, "judge", judge_failing_once)


def test_an_unexpected_error_is_a_json_500_logged_and_the_connection_still_serves(
        receiver: RunningReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours while judging (injected: judge raises once) answers like Tornado would, in
    our JSON shape, stores nothing, and the next request on the same connection is served."""
    make_judge_fail_once(monkeypatch)
    first = receiver.post("/v1/track", TRACK)
    assert (first.status_code, first.json()) == (500, single_error(
        "http_500", "Internal Server Error", "", error="Internal Server Error"))
    assert "event=handler_error path=/v1/track" in caplog.text
    second = receiver.post("/v1/track", TRACK)  # the same keep-alive client connection
    assert (second.status_code, second.json()) == (200, SUCCESS)
    assert len(receiver.outbox()) == 1


def test_a_request_that_ended_in_a_500_is_not_waited_for_by_later_commits(
        start_receiver: Callable[..., RunningReceiver], monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of requests being judged goes down however a request ends: a lone request's
    commit waits for others in progress (commit_gather_ms, 1 s here), so a count left one high
    by the 500 (or by a 200) would make every request after it wait the whole second."""
    receiver = start_receiver(commit_gather_ms=1000)
    make_judge_fail_once(monkeypatch)
    assert receiver.post("/v1/track", TRACK).status_code == 500
    for _ in range(2):
        started = time.monotonic()
        assert receiver.post("/v1/track", TRACK).status_code == 200
        assert time.monotonic() - started < 0.5
