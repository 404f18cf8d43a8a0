"""Per-source browser safety over real HTTP: allowed_origins (403 and a rejected record) and
rate limits (429 with Retry-After, counted into one rejected row per interval)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from conftest import RunningReceiver, make_config
from pipeline.config import SourceConfig
from pipeline.origins import parse_pattern

SHOP = "https://shop.example"
TRACK = {"type": "track", "userId": "u1", "event": "Viewed"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def source(name: str, key: str, origins: tuple[str, ...] = (), **limits: Any) -> SourceConfig:
    return SourceConfig(name=name, write_keys=(key,), allowed_origins=tuple(parse_pattern(o) for o in origins),
                        **limits)


@pytest.fixture
def start_with_sources(database_url: str) -> Iterator[Callable[..., RunningReceiver]]:
    started: list[RunningReceiver] = []

    def start(*sources: SourceConfig, **receiver: Any) -> RunningReceiver:
        config = replace(make_config(database_url, **receiver), sources=sources)
        started.append(RunningReceiver(config))
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def shop(start_with_sources: Callable[..., RunningReceiver]) -> RunningReceiver:
    """A web source limited to the shop and its subdomains, and a server source with no list."""
    return start_with_sources(source("web", "WEB", (SHOP, "https://*.shop.example")), source("server", "SRV"))


@pytest.mark.parametrize("origin", [SHOP, "https://eu.shop.example", "https://a.b.shop.example", None])
def test_a_listed_origin_or_none_passes(shop: RunningReceiver, origin: str | None) -> None:
    headers = {**basic("WEB"), **({"Origin": origin} if origin else {})}
    response = shop.post("/v1/track", TRACK, headers=headers)
    assert response.status_code == 200, response.text
    if origin:
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in response.headers["vary"]
    assert len(shop.outbox()) == 1 and shop.rejected() == []


@pytest.mark.parametrize("origin", ["https://evil.example", "http://shop.example", "https://shop.example:8443",
                                    "https://evilshop.example", "null"])
def test_an_unlisted_origin_is_refused_403_and_recorded(shop: RunningReceiver, origin: str) -> None:
    body = {**TRACK, "writeKey": "WEB"}
    response = shop.post("/v1/t", body, headers={"Origin": origin, "Content-Type": "text/plain"})
    assert response.status_code == 403
    assert response.json()["code"] == "origin_not_allowed" and "WEB" not in response.text
    # Readable by the page, so its SDK sees a final 4xx rather than a network error to retry.
    assert response.headers["access-control-allow-origin"] == origin
    assert "access-control-allow-credentials" not in response.headers
    assert shop.outbox() == []
    [row] = shop.rejected()
    assert (row["status"], row["code"], row["route"], row["source"]) == (403, "origin_not_allowed", "track", "web")
    assert origin in row["reason"] and row["raw"] == response.request.content


def test_a_batch_with_a_key_of_a_source_that_refuses_the_origin_is_refused_whole(shop: RunningReceiver) -> None:
    batch = {"batch": [{**TRACK, "writeKey": "SRV"}, {**TRACK, "writeKey": "WEB"}]}
    response = shop.post("/v1/batch", batch, headers={"Origin": "https://evil.example"})
    assert (response.status_code, response.json()["code"]) == (403, "origin_not_allowed")
    assert response.json()["Success"] is False
    assert shop.outbox() == []


def test_a_source_without_a_list_takes_any_origin(shop: RunningReceiver) -> None:
    response = shop.post("/v1/track", TRACK, headers={**basic("SRV"), "Origin": "https://evil.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://evil.example"
    # Echoed because the source takes every origin, not because a list names it: no credentials.
    assert "access-control-allow-credentials" not in response.headers
    preflight = shop.client.options("/v1/track", headers={"Origin": "https://evil.example"})
    assert preflight.headers["access-control-allow-origin"] == "https://evil.example"
    assert "access-control-allow-credentials" not in preflight.headers
    listed = shop.client.options("/v1/track", headers={"Origin": SHOP})
    assert listed.headers["access-control-allow-credentials"] == "true"


def test_a_preflight_allows_only_listed_origins_when_every_source_lists_them(
        start_with_sources: Callable[..., RunningReceiver]) -> None:
    receiver = start_with_sources(source("web", "WEB", (SHOP,)), source("blog", "BLOG", ("https://blog.example",)))
    for origin in (SHOP, "https://blog.example"):
        response = receiver.client.options("/v1/track", headers={"Origin": origin})
        assert response.headers["access-control-allow-origin"] == origin
    response = receiver.client.options("/v1/track", headers={"Origin": "https://evil.example"})
    assert response.status_code == 204 and "access-control-allow-origin" not in response.headers
    # The source config's preflight names its key in the query: that source's list decides.
    response = receiver.client.options("/sourceConfig/?writeKey=BLOG", headers={"Origin": SHOP})
    assert "access-control-allow-origin" not in response.headers
    response = receiver.client.options("/sourceConfig/?writeKey=WEB", headers={"Origin": SHOP})
    assert response.headers["access-control-allow-origin"] == SHOP


def test_pixels_from_an_unlisted_origin_are_recorded_and_answered_with_the_gif(shop: RunningReceiver) -> None:
    response = shop.get("/v1/pixel/track", params={**TRACK, "writeKey": "WEB"},
                        headers={"Origin": "https://evil.example"})
    assert (response.status_code, response.headers["content-type"]) == (200, "image/gif")
    assert shop.outbox() == []
    assert [r["code"] for r in shop.rejected()] == ["origin_not_allowed"]


def test_rate_limit_answers_429_with_retry_after_and_counts_into_one_row(
        start_with_sources: Callable[..., RunningReceiver]) -> None:
    receiver = start_with_sources(source("web", "WEB", rate_limit_per_second=0.5, rate_limit_burst=3))
    answers = [receiver.post("/v1/track", TRACK, headers=basic("WEB")) for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 3 + [429] * 5
    refused = answers[-1]
    assert refused.json()["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 2  # one token every 2 s
    assert refused.headers["access-control-expose-headers"] == "Retry-After"
    assert len(receiver.outbox()) == 3
    assert receiver.rejected() == []  # counted, written once per interval (or at shutdown)
    receiver.stop()
    [row] = _rows_after_stop(receiver)
    assert (row["code"], row["status"], row["source"], row["route"]) == ("rate_limited", 429, "web", "track")
    assert row["reason"].startswith("5 request(s) over the rate limit")


def _rows_after_stop(receiver: RunningReceiver) -> list[dict[str, Any]]:
    from pipeline.store import Store, create_store_engine

    store = Store(create_store_engine(receiver.config.database))
    try:
        return store.rows("rejected")
    finally:
        store.dispose()


def test_rate_limit_lets_requests_through_again_after_the_wait(
        start_with_sources: Callable[..., RunningReceiver]) -> None:
    receiver = start_with_sources(source("web", "WEB", rate_limit_per_second=20, rate_limit_burst=1))
    assert receiver.post("/v1/track", TRACK, headers=basic("WEB")).status_code == 200
    statuses = [receiver.post("/v1/track", TRACK, headers=basic("WEB")).status_code for _ in range(3)]
    assert 429 in statuses
    time.sleep(0.12)
    assert receiver.post("/v1/track", TRACK, headers=basic("WEB")).status_code == 200


def test_client_rate_limit_is_per_client_address(start_with_sources: Callable[..., RunningReceiver]) -> None:
    receiver = start_with_sources(source("web", "WEB", client_rate_limit_per_second=0.1, client_rate_limit_burst=2),
                                  trust_forwarded_headers=True)
    for client in ("10.0.0.1", "10.0.0.2"):
        headers = {**basic("WEB"), "X-Forwarded-For": client}
        assert [receiver.post("/v1/t", TRACK, headers=headers).status_code for _ in range(3)] == [200, 200, 429]
    assert len(receiver.outbox()) == 4


def test_other_sources_are_not_limited(start_with_sources: Callable[..., RunningReceiver]) -> None:
    receiver = start_with_sources(source("web", "WEB", rate_limit_per_second=0.1, rate_limit_burst=1),
                                  source("server", "SRV"))
    assert receiver.post("/v1/t", TRACK, headers=basic("WEB")).status_code == 200
    assert receiver.post("/v1/t", TRACK, headers=basic("WEB")).status_code == 429
    assert [receiver.post("/v1/t", TRACK, headers=basic("SRV")).status_code for _ in range(5)] == [200] * 5


def test_a_rate_limited_pixel_is_answered_429_not_the_gif(start_with_sources: Callable[..., RunningReceiver]) -> None:
    receiver = start_with_sources(source("web", "WEB", rate_limit_per_second=0.5, rate_limit_burst=1))
    params = {**TRACK, "writeKey": "WEB"}
    first, second = (receiver.get("/v1/pixel/track", params=params) for _ in range(2))
    assert (first.status_code, first.headers["content-type"]) == (200, "image/gif")
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["code"] == "rate_limited"
    assert len(receiver.outbox()) == 1  # every 200 is a stored event


def test_a_flood_of_forged_origins_costs_a_row_an_interval_past_the_first_few(shop: RunningReceiver) -> None:
    from receiver.guard import ORIGIN_ROWS_PER_INTERVAL

    refused = ORIGIN_ROWS_PER_INTERVAL + 5
    for _ in range(refused):
        response = shop.post("/v1/t", TRACK, headers={**basic("WEB"), "Origin": "https://evil.example"})
        assert response.status_code == 403
    assert len(shop.rejected()) == ORIGIN_ROWS_PER_INTERVAL
    shop.stop()
    rows = _rows_after_stop(shop)
    [counted] = [row for row in rows if row["raw"] is None]
    assert (counted["code"], counted["status"], counted["source"]) == ("origin_not_allowed", 403, "web")
    assert counted["reason"].startswith("5 request(s) from an origin not allowed")
    assert len(rows) == ORIGIN_ROWS_PER_INTERVAL + 1
