"""CORS: preflight on every /v1 route, and CORS headers on every /v1 answer, errors included."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import RunningReceiver

V1_ROUTES = [f"/v1/{name}" for name in (
    "identify", "i", "track", "t", "page", "p", "screen", "s", "group", "g", "alias", "a",
    "batch", "import", "b", "webhook", "w", "m",
    "pixel/track", "pixel/page", "pixel/screen", "pixel/identify", "pixel/group", "pixel/alias")]
SHARED = {"access-control-allow-headers": "Content-Type, Authorization, X-Retry-Count",
          "access-control-max-age": "86400", "access-control-expose-headers": "Retry-After"}
OPEN = {**SHARED, "access-control-allow-origin": "*"}
TRACK = {"type": "track", "userId": "u1", "event": "Signed Up"}
ORIGIN = "https://a.example"


def cors(response: httpx.Response) -> dict[str, str]:
    """The response's CORS-related headers that the issue names, lower-cased."""
    names = ("access-control-allow-origin", "access-control-allow-headers", "access-control-max-age", "vary",
             "access-control-allow-credentials", "access-control-expose-headers",
             "access-control-allow-private-network")
    return {name: response.headers[name] for name in names if name in response.headers}


def preflight(receiver: RunningReceiver, path: str, origin: str = "https://shop.example",
              requested: str | None = "content-type", **extra: str) -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", **extra}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    return receiver.client.options(path, headers=headers)


# What a preflight answers when it asked for "content-type" and every origin is welcome.
ASKED = {**OPEN, "access-control-allow-headers": "content-type", "vary": "Access-Control-Request-Headers"}
# What RudderStack's JavaScript SDK v3 asks for on a retried POST.
RUDDERSTACK = ("anonymousid,authorization,content-type,rsa-retry-attempt,rsa-retry-reason,"
               "rsa-since-first-attempt,rsa-since-last-attempt,sentat")


@pytest.mark.parametrize("path", V1_ROUTES + ["/sourceConfig", "/sourceConfig/", "/v1/projects/k/settings"])
def test_preflight_on_every_browser_route_is_204_with_cors_headers(receiver: RunningReceiver, path: str) -> None:
    response = preflight(receiver, path)
    assert (response.status_code, response.content) == (204, b"")
    assert cors(response) == ASKED
    assert receiver.outbox() == [] and receiver.rejected() == []


def test_preflight_allows_the_headers_it_asks_for(receiver: RunningReceiver) -> None:
    response = preflight(receiver, "/v1/track", requested=RUDDERSTACK)
    assert response.headers["access-control-allow-headers"] == RUDDERSTACK.replace(",", ", ")
    response = preflight(receiver, "/v1/track", requested="X-Custom ,\tAuthorization")
    assert response.headers["access-control-allow-headers"] == "X-Custom, Authorization"


@pytest.mark.parametrize("requested", ["content-type, bad header", "a,,b", "content-type;x", "",
                                       "x-" + "a" * 3000])
def test_preflight_with_an_invalid_header_list_gets_the_default_list(receiver: RunningReceiver,
                                                                     requested: str) -> None:
    response = preflight(receiver, "/v1/track", requested=requested)
    assert (response.status_code, cors(response)) == (204, OPEN)


def test_private_network_preflight_is_answered(receiver: RunningReceiver) -> None:
    response = preflight(receiver, "/v1/track", **{"Access-Control-Request-Private-Network": "true"})
    assert response.headers["access-control-allow-private-network"] == "true"
    assert "access-control-allow-private-network" not in preflight(receiver, "/v1/track").headers


def test_credentials_are_never_allowed_with_a_wildcard_origin(receiver: RunningReceiver) -> None:
    for response in (preflight(receiver, "/v1/t"), receiver.post("/v1/t", TRACK, headers={"Origin": ORIGIN})):
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


def test_preflight_on_a_path_that_is_not_for_browsers_is_refused(receiver: RunningReceiver) -> None:
    response = preflight(receiver, "/health")
    assert response.status_code == 405 and cors(response) == {}


@pytest.mark.parametrize(("path", "body"), [("/v1/track", TRACK), ("/v1/b", {"batch": [TRACK]}), ("/v1/m", {})])
def test_success_answers_carry_cors_headers(receiver: RunningReceiver, path: str, body: Any) -> None:
    response = receiver.post(path, body, headers={"Origin": "https://shop.example"})
    assert (response.status_code, cors(response)) == (200, OPEN)


def test_pixel_answers_carry_cors_headers(receiver: RunningReceiver) -> None:
    response = receiver.get("/v1/pixel/track", params={"userId": "u1", "event": "Viewed"})
    assert (response.status_code, response.headers["content-type"], cors(response)) == (200, "image/gif", OPEN)


def test_partial_success_answer_carries_cors_headers(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/batch", {"batch": [TRACK, {"type": "track"}]})
    assert (response.status_code, cors(response)) == (207, OPEN)


@pytest.mark.parametrize(("method", "path", "content", "status"), [
    ("POST", "/v1/track", b"{", 400),
    ("POST", "/v1/batch", b'{"batch": []}', 400),
    ("POST", "/v1/track", b'{"type": "track", "userId": "u1", "event": "' + b"x" * 20000 + b'"}', 413),
    ("POST", "/v1/nope", b"{}", 404),
    ("GET", "/v1/track", None, 405),
    ("PUT", "/v1/batch", b"{}", 405),
])
def test_error_answers_carry_cors_headers(receiver: RunningReceiver, method: str, path: str,
                                          content: bytes | None, status: int) -> None:
    response = receiver.client.request(method, path, content=content, headers={"Origin": "https://shop.example"})
    assert (response.status_code, cors(response)) == (status, OPEN)
    assert response.json()["code"]


def test_health_is_not_a_v1_route_and_has_no_cors_headers(receiver: RunningReceiver) -> None:
    response = receiver.get("/health", headers={"Origin": "https://shop.example"})
    assert (response.status_code, cors(response)) == (200, {})


@pytest.fixture
def allow_listed(start_receiver: Any) -> RunningReceiver:
    return start_receiver(cors_origins=(ORIGIN,))


def test_allowed_origin_is_echoed_with_vary(allow_listed: RunningReceiver) -> None:
    expected = {**SHARED, "access-control-allow-origin": ORIGIN, "vary": "Origin",
                "access-control-allow-credentials": "true"}
    assert cors(preflight(allow_listed, "/v1/t", ORIGIN, requested=None)) == expected
    assert cors(preflight(allow_listed, "/v1/t", ORIGIN)) == {
        **expected, "access-control-allow-headers": "content-type", "vary": "Origin, Access-Control-Request-Headers"}
    response = allow_listed.post("/v1/t", TRACK, headers={"Origin": ORIGIN})
    assert (response.status_code, cors(response)) == (200, expected)
    response = allow_listed.post("/v1/t", b"{", headers={"Origin": ORIGIN})
    assert (response.status_code, cors(response)) == (400, expected)


@pytest.mark.parametrize("origin", ["https://evil.example", "https://a.example.evil", "http://a.example", None])
def test_foreign_origin_gets_no_allow_origin_but_vary(allow_listed: RunningReceiver, origin: str | None) -> None:
    headers = {"Origin": origin} if origin else {}
    expected = {**SHARED, "vary": "Origin"}
    response = allow_listed.client.options("/v1/batch", headers=headers)
    assert (response.status_code, cors(response)) == (204, expected)
    response = allow_listed.post("/v1/batch", {"batch": [TRACK]}, headers=headers)
    assert (response.status_code, cors(response)) == (200, expected)
    assert len(allow_listed.outbox()) == 1
