"""Write keys: every place a client may put one, which wins, and what closed and open mode answer."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.config import SourceConfig
from pipeline.sources import OPEN_SOURCE, SourceRegistry, message_write_key
from receiver.auth import basic_auth_username

SOURCES = {"website": ["ILoveData123"], "app": ["k2"]}
SUCCESS = {"Success": True}
INVALID_KEY = {"Error": "Bad Request", "Message": "Invalid or missing writekey", "Details": "",
               "code": "invalid_write_key", "message": "Invalid or missing writekey"}


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u1", "event": "Signed Up", **fields}


def basic(raw: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


def bad_item(index: int) -> dict[str, Any]:
    return {"Error": "Bad Request", "Message": "Invalid or missing writekey", "Details": "",
            "Index": index, "code": "invalid_write_key"}


def stored(receiver: Any) -> list[tuple[str, str | None, str | None]]:
    return [(row["source"], row["auth_key"], row["override_key"]) for row in receiver.outbox()]


@pytest.fixture
def closed(start_receiver: Callable[..., Any]) -> Any:
    """A receiver in closed mode: two sources, one key each."""
    return start_receiver(sources=SOURCES)


# --- Every place a key can be ----------------------------------------------------------------


@pytest.mark.parametrize("key, source", [("ILoveData123", "website"), ("k2", "app")])
def test_message_write_key_picks_the_source(closed: Any, key: str, source: str) -> None:
    response = closed.post("/v1/track", track(writeKey=key))
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [(source, None, None)]


def test_batch_body_write_key_picks_the_source(closed: Any) -> None:
    response = closed.post("/v1/batch", {"batch": [track(), track(userId="u2")], "writeKey": "k2"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", None, None)]


@pytest.mark.parametrize("authorization", [
    "Basic " + base64.b64encode(b"ILoveData123:").decode(),
    "Basic " + base64.b64encode(b"ILoveData123").decode(),
    "Basic " + base64.b64encode(b"ILoveData123:\n").decode(),  # echo ILoveData123: | base64
    "Basic " + base64.b64encode(b"ILoveData123:").decode().rstrip("="),
    "basic   " + base64.b64encode(b"ILoveData123:").decode(),
], ids=["with-colon", "without-colon", "echo-newline", "unpadded", "lower-case-scheme"])
def test_basic_auth_username_is_the_write_key(closed: Any, authorization: str) -> None:
    response = closed.post("/v1/track", track(), headers={"Authorization": authorization})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("website", "ILoveData123", None)]


def test_basic_auth_from_the_http_client_on_a_batch(closed: Any) -> None:
    response = closed.post("/v1/b", {"batch": [track()]}, auth=("k2", ""))
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", "k2", None)]


@pytest.mark.parametrize("path", ["/v1/webhook", "/v1/w"])
def test_webhook_query_key_overrides_a_wrong_body_key(closed: Any, path: str) -> None:
    response = closed.post(f"{path}?writeKey=k2", track(writeKey="wrong"))
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", None, "k2")]


def test_webhook_query_key_overrides_every_message_of_a_batch(closed: Any) -> None:
    body = {"batch": [track(writeKey="wrong"), track(writeKey="ILoveData123")], "writeKey": "bad"}
    response = closed.post("/v1/webhook?writeKey=k2", body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", None, "k2")]


def test_spec_batch_example_with_a_key_in_each_message(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(sources={"spec": ["test1"]})
    message = {"anonymousId": "cf09e649-fd0b-46b6-9fc1-53ab9cd05c47", "sentAt": "2020-03-02T18:29:53.661Z",
               "timestamp": "2020-03-02T18:29:27.333Z", "type": "track", "writeKey": "test1",
               "event": "example 1 event"}
    body = {"batch": [{**message, "messageId": "317b11a8-8cd3-40ad-b3fb-622835c42cfd"},
                      {**message, "messageId": "317b11a8-8cd3-40ad-b3fb-123d417b11a8"}],
            "context": {"page": {"path": "/mycart/home", "referrer": "https://www.example.com/",
                                 "title": "Example - Shopping Cart",
                                 "url": "https://www.example.com/mycart/home"},
                        "userAgent": "Mozilla/5.0 (Windows NT 6.1; Win64; x64)"},
            "integrations": {"All": False, "Mixpanel": True}}
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(receiver) == [("spec", None, None)]


def test_messages_of_one_batch_may_carry_keys_of_different_sources(closed: Any) -> None:
    # One row per request; it carries the first accepted message's source, and the pipeline
    # resolves each message again from the stored body.
    response = closed.post("/v1/batch", {"batch": [track(writeKey="k2"), track(writeKey="ILoveData123")]})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", None, None)]


# --- Missing and unknown keys ----------------------------------------------------------------


@pytest.mark.parametrize("message, headers", [
    (track(), {}),
    (track(writeKey="nope"), {}),
    (track(writeKey=""), {}),
    (track(writeKey="ilovedata123"), {}),
    (track(writeKey="ILoveData12"), {}),
    (track(), basic("nope:")),
    (track(), {"Authorization": "Bearer ILoveData123"}),
], ids=["missing", "unknown", "empty", "wrong-case", "prefix", "unknown-basic", "bearer"])
def test_missing_or_unknown_key_on_a_single_route_is_400(closed: Any, message: dict[str, Any],
                                                         headers: dict[str, str]) -> None:
    response = closed.post("/v1/identify", {**message, "type": "identify"}, headers=headers)
    assert response.status_code == 400
    assert response.json() == INVALID_KEY
    assert closed.outbox() == []
    rows = closed.rejected()
    assert [(r["route"], r["status"], r["code"], r["reason"], r["source"]) for r in rows] == [
        ("identify", 400, "invalid_write_key", "Invalid or missing writekey", None)]


def test_batch_with_some_bad_keys_is_207_listing_them(closed: Any) -> None:
    body = {"batch": [track(writeKey="nope"), track(), track(writeKey="ILoveData123"), track(writeKey="x")]}
    response = closed.post("/v1/batch", body)
    assert response.status_code == 207
    assert response.json() == {"Success": False, "Errors": [bad_item(0), bad_item(1), bad_item(3)],
                               "code": "partial_success", "message": "3 of 4 messages were rejected"}
    assert stored(closed) == [("website", None, None)]
    assert closed.rejected() == []


def test_batch_where_every_key_is_bad_is_400(closed: Any) -> None:
    response = closed.post("/v1/import", {"batch": [track(writeKey="nope"), track()], "writeKey": "bad"})
    assert response.status_code == 400
    assert response.json() == {"Success": False, "Errors": [bad_item(0), bad_item(1)],
                               "code": "invalid_write_key", "message": "Invalid or missing writekey"}
    assert closed.outbox() == []
    assert [(r["route"], r["status"], r["code"]) for r in closed.rejected()] == [
        ("batch", 400, "invalid_write_key")]


def test_batch_write_key_that_is_not_a_string_is_400(closed: Any) -> None:
    response = closed.post("/v1/batch", {"batch": [track(writeKey="k2")], "writeKey": 42})
    assert response.status_code == 400
    assert response.json() == {
        "Success": False,
        "Errors": [{"Error": "Bad Request", "Message": "Invalid or missing writekey",
                    "Details": "writeKey must be a string", "code": "invalid_write_key"}],
        "code": "invalid_write_key", "message": "Invalid or missing writekey"}
    assert closed.outbox() == []


# --- Which key wins ---------------------------------------------------------------------------


def test_message_key_beats_batch_key(closed: Any) -> None:
    response = closed.post("/v1/batch", {"batch": [track(writeKey="ILoveData123")], "writeKey": "k2"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("website", None, None)]


def test_wrong_message_key_is_not_rescued_by_a_good_batch_key(closed: Any) -> None:
    response = closed.post("/v1/batch", {"batch": [track(writeKey="wrong"), track()], "writeKey": "k2"})
    assert response.status_code == 207
    assert response.json()["Errors"] == [bad_item(0)]
    assert stored(closed) == [("app", None, None)]


def test_batch_key_beats_basic_auth(closed: Any) -> None:
    response = closed.post("/v1/batch", {"batch": [track()], "writeKey": "k2"}, headers=basic("ILoveData123:"))
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", "ILoveData123", None)]


def test_message_key_beats_basic_auth(closed: Any) -> None:
    response = closed.post("/v1/track", track(writeKey="k2"), headers=basic("ILoveData123:"))
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", "ILoveData123", None)]


def test_wrong_message_key_is_not_rescued_by_good_basic_auth(closed: Any) -> None:
    response = closed.post("/v1/track", track(writeKey="wrong"), headers=basic("ILoveData123:"))
    assert (response.status_code, response.json()) == (400, INVALID_KEY)
    assert closed.outbox() == []


def test_webhook_override_beats_every_other_key(closed: Any) -> None:
    body = {"batch": [track(writeKey="ILoveData123")], "writeKey": "ILoveData123"}
    response = closed.post("/v1/webhook?writeKey=k2", body, headers=basic("ILoveData123:"))
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(closed) == [("app", "ILoveData123", "k2")]


def test_wrong_webhook_override_is_not_rescued_by_good_body_keys(closed: Any) -> None:
    response = closed.post("/v1/webhook?writeKey=wrong", track(writeKey="ILoveData123"),
                           headers=basic("ILoveData123:"))
    assert (response.status_code, response.json()) == (400, INVALID_KEY)
    assert closed.outbox() == []


# --- Open mode ----------------------------------------------------------------------------------


def test_open_mode_needs_no_key_and_stores_the_default_source(receiver: Any) -> None:
    response = receiver.post("/v1/track", track())
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert stored(receiver) == [("default", None, None)]


def test_open_mode_accepts_any_key_and_keeps_where_it_came_from(receiver: Any) -> None:
    first = receiver.post("/v1/batch", {"batch": [track(writeKey="anything")]}, headers=basic("who:"))
    second = receiver.post("/v1/webhook?writeKey=over", track())
    assert [(r.status_code, r.json()) for r in (first, second)] == [(200, SUCCESS), (200, SUCCESS)]
    assert stored(receiver) == [("default", "who", None), ("default", None, "over")]


# --- Unit: Basic auth, key precedence, the source registry --------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("header, username", [
    (None, None),
    ("", None),
    ("Basic " + b64(b"key:"), "key"),
    ("Basic " + b64(b"key"), "key"),
    ("Basic " + b64(b"key:\n"), "key"),
    ("Basic " + b64(b"key\n"), "key"),
    ("Basic " + b64(b"key:\r\n"), "key"),
    ("Basic " + b64(b"key:secret"), "key"),
    ("Basic " + b64(b"key:").rstrip("="), "key"),
    ("BASIC " + b64(b"key:"), "key"),
    ("  Basic   " + b64(b"key:") + "  ", "key"),
    ("Basic " + b64(b"cl\xc3\xa9:"), "clé"),
    ("Basic " + b64(b":"), None),
    ("Basic " + b64(b":password"), None),
    ("Basic " + b64(b"\n"), None),
    ("Basic", None),
    ("Basic ", None),
    ("Basic !!not base64!!", None),
    ("Bearer " + b64(b"key:"), None),
    (b64(b"key:"), None),
])
def test_basic_auth_username(header: str | None, username: str | None) -> None:
    assert basic_auth_username(header) == username


@pytest.mark.parametrize("message, override, batch, auth, key", [
    ({"writeKey": "m"}, "o", "b", "a", "o"),
    ({"writeKey": "m"}, None, "b", "a", "m"),
    ({"writeKey": ""}, None, "b", "a", "b"),
    ({}, None, "b", "a", "b"),
    ({}, None, None, "a", "a"),
    ({}, None, None, None, None),
    ({}, "", "", "", None),
    ({"writeKey": 42}, None, None, "a", "a"),
    ("not a message", None, "b", "a", "b"),
])
def test_message_write_key_most_specific_first(message: Any, override: str | None, batch: str | None,
                                               auth: str | None, key: str | None) -> None:
    assert message_write_key(message, override, batch, auth) == key


def registry() -> SourceRegistry:
    return SourceRegistry([SourceConfig(name="website", write_keys=("ILoveData123", "old-key")),
                           SourceConfig(name="app", write_keys=("k2",)),
                           SourceConfig(name="intl", write_keys=("clé",))])


@pytest.mark.parametrize("key, source", [
    ("ILoveData123", "website"), ("old-key", "website"), ("k2", "app"), ("clé", "intl"),
    ("ILoveData1234", None), ("ILoveData12", None), ("ilovedata123", None), (" k2", None),
    ("", None), (None, None),
])
def test_source_registry_in_closed_mode(key: str | None, source: str | None) -> None:
    sources = registry()
    assert not sources.open_mode
    assert sources.source_for(key) == source


@pytest.mark.parametrize("key", ["anything", "", None])
def test_source_registry_in_open_mode(key: str | None) -> None:
    sources = SourceRegistry([])
    assert sources.open_mode
    assert sources.source_for(key) == OPEN_SOURCE == "default"

