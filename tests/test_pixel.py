"""GET /v1/pixel/<type>: a 1x1 GIF whatever the input; valid messages in the outbox, the rest in rejected."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from conftest import RunningReceiver, unique_id
from outage import store_down

TYPES = ("track", "page", "screen", "identify", "group", "alias")

# The spec's own pixel URL (http-tracking-api.md, "Tracking Pixel"), its data= value verbatim.
SPEC_DATA = (
    "ewogICAgImludGVncmF0aW9ucyI6IHt9LAogICAgImNvbnRleHQiOiB7CiAgICAgICAgInBhZ2UiOiB7CiAgICAgICAgICAgICJwYXRo"
    "IjogIi9ob21lIgogICAgICAgIH0sCiAgICAgICAgImxpYnJhcnkiOiB7CiAgICAgICAgICAgICJuYW1lIjogImFuYWx5dGljcy5qcyIs"
    "CiAgICAgICAgICAgICJ2ZXJzaW9uIjogIjMuMi4yMSIKICAgICAgICB9CiAgICB9LAogICAgImV2ZW50IjogImV4YW1wbGUgZXZlbnQi"
    "LAogICAgIm1lc3NhZ2VJZCI6ICIxMjM0NTY3ODkwIiwKICAgICJ0eXBlIjogInRyYWNrIiwKICAgICJ3cml0ZUtleSI6ICJleGFtcGxl"
    "IiwKICAgICJ1c2VySWQiOiAiMDk4NzY1NDMyMSIKfQ=="
)
SPEC_MESSAGE = {
    "integrations": {},
    "context": {"page": {"path": "/home"}, "library": {"name": "analytics.js", "version": "3.2.21"}},
    "event": "example event",
    "messageId": "1234567890",
    "type": "track",
    "writeKey": "example",
    "userId": "0987654321",
}


def message_for(route_type: str, **extra: Any) -> dict[str, Any]:
    """A valid message of ``route_type``, without a ``type`` (the pixel route gives it)."""
    message: dict[str, Any] = {"userId": "u1", "messageId": unique_id(), **extra}
    if route_type == "track":
        message["event"] = "Signed Up"
    elif route_type == "group":
        message["groupId"] = "g1"
    elif route_type == "alias":
        message["previousId"] = "anon-1"
    return message


def encode(body: bytes) -> str:
    return base64.b64encode(body).decode("ascii")


def assert_gif(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/gif"
    assert response.content.startswith(b"GIF89a")
    assert len(response.content) == 42  # the 1x1 transparent GIF, whole
    cache_control = response.headers["Cache-Control"]
    assert "no-cache" in cache_control and "no-store" in cache_control
    assert response.headers["Pragma"] == "no-cache"
    assert response.headers["Expires"] == "0"


def stored_body(receiver: RunningReceiver) -> bytes:
    rows = receiver.outbox()
    assert len(rows) == 1
    return rows[0]["body"]


@pytest.mark.parametrize("route_type", TYPES)
def test_every_pixel_route_answers_a_gif_and_stores_the_message(receiver: RunningReceiver,
                                                                route_type: str) -> None:
    body = json.dumps(message_for(route_type)).encode()

    response = receiver.get(f"/v1/pixel/{route_type}", params={"data": encode(body)})

    assert_gif(response)
    [row] = receiver.outbox()
    assert (row["route"], row["source"], row["body"]) == (f"pixel/{route_type}", "default", body)
    assert receiver.rejected() == []


def test_the_spec_pixel_url_stores_its_decoded_json(receiver: RunningReceiver) -> None:
    response = receiver.get(f"/v1/pixel/track?data={SPEC_DATA}")

    assert_gif(response)
    body = stored_body(receiver)
    assert body == base64.b64decode(SPEC_DATA)
    assert json.loads(body) == SPEC_MESSAGE


def awkward_body() -> tuple[bytes, str]:
    """A message whose standard base64 holds '+', '/' and padding, and that encoding."""
    # "???" encodes to "Pz8/" and ">>>" to "Pj4+" when aligned on 3 bytes; runs of 6 always are.
    for n in range(12):
        body = json.dumps(message_for("track", properties={"note": "??????>>>>>>", "pad": "x" * n})).encode()
        encoded = encode(body)
        if "+" in encoded and "/" in encoded and encoded.endswith("="):
            return body, encoded
    raise AssertionError("no awkward body found")


def test_url_safe_base64_without_padding(receiver: RunningReceiver) -> None:
    body, _ = awkward_body()
    data = base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")
    assert "-" in data and "_" in data

    assert_gif(receiver.get(f"/v1/pixel/track?data={data}"))
    assert stored_body(receiver) == body


def test_standard_base64_with_a_plus_that_arrives_as_a_space(receiver: RunningReceiver) -> None:
    body, data = awkward_body()

    # '+' left unescaped in a query string is decoded as a space by the server.
    response = receiver.get(f"/v1/pixel/track?data={data}")

    assert "+" in str(response.request.url)
    assert_gif(response)
    assert stored_body(receiver) == body


def test_standard_base64_percent_encoded(receiver: RunningReceiver) -> None:
    body, data = awkward_body()

    response = receiver.get("/v1/pixel/track", params={"data": data})

    assert "%2B" in str(response.request.url)
    assert_gif(response)
    assert stored_body(receiver) == body


def test_without_data_the_message_is_built_from_dotted_query_keys(receiver: RunningReceiver) -> None:
    response = receiver.get("/v1/pixel/track?userId=u1&event=Signed+Up&properties.plan=pro&writeKey=k")

    assert_gif(response)
    assert json.loads(stored_body(receiver)) == {
        "userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"}, "writeKey": "k"}


def test_a_query_write_key_picks_the_source_in_closed_mode(start_receiver: Any) -> None:
    receiver = start_receiver(sources={"website": ["k"]})

    assert_gif(receiver.get("/v1/pixel/page?anonymousId=a1&name=Home&writeKey=k"))

    [row] = receiver.outbox()
    assert row["source"] == "website"
    assert json.loads(row["body"]) == {"anonymousId": "a1", "name": "Home", "writeKey": "k"}


INVALID = {
    "bad_base64": ("data=!!not*base64!!", "invalid_base64", 400),
    "bad_json": (f"data={encode(b'{not json')}", "invalid_json", 400),
    "not_an_object": (f"data={encode(b'[1, 2]')}", "invalid_message", 400),
    "missing_user_id": (f"data={encode(json.dumps({'event': 'e'}).encode())}", "missing_user_id", 400),
    "type_mismatch": (f"data={encode(json.dumps({'type': 'page', 'userId': 'u'}).encode())}", "type_mismatch", 400),
    "bad_write_key": (f"data={encode(json.dumps({'userId': 'u', 'event': 'e', 'writeKey': 'nope'}).encode())}",
                      "invalid_write_key", 400),
    "missing_write_key": ("userId=u&event=e", "invalid_write_key", 400),
    "too_large": (f"data={encode(json.dumps({'userId': 'u', 'event': 'e', 'p': 'x' * 15400}).encode())}",
                  "payload_too_large", 413),
}


@pytest.mark.parametrize("query,code,status", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_pixel_answers_the_gif_and_is_recorded_as_rejected(
        start_receiver: Any, query: str, code: str, status: int) -> None:
    receiver = start_receiver(sources={"website": ["secret"]})

    assert_gif(receiver.get(f"/v1/pixel/track?{query}"))

    assert receiver.outbox() == []
    [row] = receiver.rejected()
    assert (row["route"], row["code"], row["status"]) == ("pixel/track", code, status)
    assert row["raw"]
    assert row["received_at_ms"] > 0


def test_rejected_raw_input_is_cut_to_the_configured_size(start_receiver: Any) -> None:
    receiver = start_receiver(rejected_raw_bytes=64)
    body = json.dumps({"event": "e", "properties": {"text": "y" * 500}}).encode()

    assert_gif(receiver.get("/v1/pixel/track", params={"data": encode(body)}))

    [row] = receiver.rejected()
    assert (row["code"], row["raw"]) == ("missing_user_id", body[:64])


def test_a_pixel_gets_503_not_the_gif_when_the_store_is_down(start_receiver: Any, database_url: str) -> None:
    receiver = start_receiver(lock_timeout_seconds=0.3)
    data = encode(json.dumps(message_for("track")).encode())

    with store_down(database_url):
        response = receiver.get("/v1/pixel/track", params={"data": data})

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "store_unavailable"
    assert receiver.outbox() == []
    assert_gif(receiver.get("/v1/pixel/track", params={"data": data}))
    assert len(receiver.outbox()) == 1


@pytest.mark.parametrize(("query", "code"), [
    ("userId=u1&event=x&" + "properties." + ".".join(["a"] * 300) + "=1", "nesting_too_deep"),
    ("data=%ff", "invalid_pixel"),
    ("data=e30%ff", "invalid_pixel"),
    ("userId=%ff&event=x", "invalid_pixel"),
    ("userId=u1&event=x&%ff=1", "invalid_pixel"),
    ("userId=u1&event=x&properties.a=1&properties.a.b=2", "invalid_pixel"),
    ("userId=u1&event=x&properties.a.b=2&properties.a=1", "invalid_pixel"),
])
def test_a_pixel_query_that_cannot_be_kept_as_sent_is_recorded_and_answered_with_the_gif(
        receiver: RunningReceiver, query: str, code: str) -> None:
    response = receiver.get(f"/v1/pixel/track?{query}")
    assert_gif(response)
    assert receiver.outbox() == []
    assert [row["code"] for row in receiver.rejected()] == [code]


def test_dotted_keys_and_values_in_utf8_are_kept_as_sent(receiver: RunningReceiver) -> None:
    response = receiver.get("/v1/pixel/track?userId=%C3%A9l%C3%A8ve&event=x&properties.caf%C3%A9=cr%C3%A8me")
    assert_gif(response)
    [row] = receiver.outbox()
    assert json.loads(row["body"]) == {"userId": "élève", "event": "x", "properties": {"café": "crème"}}
