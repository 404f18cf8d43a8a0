"""The webhook adapter against a real HTTP sink on a loopback port."""

from __future__ import annotations

import asyncio
import re
import base64
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import pytest

from http_sink import Answer, HttpSink, Recorded, closed_port_url
from pipeline.destinations.base import DELIVERED, Event, Outcome, rejected, retry
from pipeline.destinations.contract import contract_events, while_started
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    running = HttpSink()
    yield running
    running.stop()


def deliver(url: str, events: list[Event], batch_size: int = 1, **options: Any) -> list[Outcome]:
    destination = WebhookDestination("hook", WebhookOptions(url=url, **options), batch_size)
    return asyncio.run(while_started(destination, lambda d: d.deliver(events)))


def by_id(events: list[Any]) -> list[Any]:
    return sorted(events, key=lambda event: event["messageId"])


def ids(events: list[Any]) -> tuple[str, ...]:
    return tuple(event["messageId"] for event in events)


def test_batch_size_one_posts_each_event_as_the_json_body(sink: HttpSink) -> None:
    events = contract_events(4)

    assert deliver(sink.url + "/in", events) == [DELIVERED] * 4
    assert by_id(sink.bodies()) == by_id(events)
    assert {r.path for r in sink.requests} == {"/in"}
    assert {(r.headers["Content-Type"], r.headers["User-Agent"]) for r in sink.requests} == {
        ("application/json", f"trackrelay/{version('trackrelay')}")}


def test_a_larger_batch_size_posts_each_chunk_in_the_segment_batch_shape(sink: HttpSink) -> None:
    events = contract_events(7)

    assert deliver(sink.url + "/in", events, batch_size=3) == [DELIVERED] * 7
    assert [list(body) for body in sink.bodies()] == [["batch"]] * 3
    assert {ids(body["batch"]): body["batch"] for body in sink.bodies()} == {
        ids(chunk): chunk for chunk in (events[0:3], events[3:6], events[6:7])}


def test_503_with_retry_after_is_retried_after_that_many_seconds(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(503, b"busy", {"Retry-After": "7"})

    assert deliver(sink.url, contract_events(2)) == [retry("HTTP 503: busy", 7.0)] * 2


@pytest.mark.parametrize("status", [429, 500])
def test_429_and_500_are_retried(sink: HttpSink, status: int) -> None:
    sink.answers = lambda _: Answer(status, b"later")

    assert deliver(sink.url, contract_events(3), batch_size=3) == [retry(f"HTTP {status}: later")] * 3


def test_an_event_json_cannot_encode_is_rejected_and_never_sent(sink: HttpSink) -> None:
    """Events come from JSON, so this takes an adapter handed something else (a bug upstream,
    or a future source of events): refused for good rather than retried forever, and the
    sink sees no request."""
    good, bad = contract_events(2)
    bad = {**bad, "properties": {"tags": {"a", "b"}}}  # a set: not JSON

    outcomes = deliver(sink.url, [good, bad])

    assert outcomes[0] == DELIVERED
    assert outcomes[1].kind == "rejected" and outcomes[1].reason.startswith("cannot encode as JSON: ")
    assert ids(sink.bodies()) == (good["messageId"],)


def test_501_is_rejected(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(501, b"no POST here")

    assert deliver(sink.url, contract_events(1)) == [rejected("HTTP 501: no POST here")]


def test_400_is_rejected_with_the_status_and_body(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(400, b'{"error": "bad event"}')

    assert deliver(sink.url, contract_events(2), batch_size=2) == [rejected('HTTP 400: {"error": "bad event"}')] * 2


def test_each_event_gets_the_outcome_of_its_own_chunk_in_order(sink: HttpSink) -> None:
    events = contract_events(5)
    events[3]["event"] = "poison"

    def answer(request: Recorded) -> Answer:
        return Answer(400, b"poison") if b'"poison"' in request.body else Answer(200)

    sink.answers = answer
    assert deliver(sink.url, events, batch_size=2) == [DELIVERED, DELIVERED, rejected("HTTP 400: poison"),
                                                       rejected("HTTP 400: poison"), DELIVERED]


def test_a_sink_that_hangs_past_the_timeout_is_retried(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(200, delay=10)

    [outcome] = deliver(sink.url, contract_events(1), timeout_seconds=0.3)
    assert (outcome.kind, outcome.reason, outcome.retry_after) == ("retry", "timed out (ReadTimeout)", None)


def test_a_refused_connection_is_retried() -> None:
    [outcome] = deliver(closed_port_url(), contract_events(1))
    assert (outcome.kind, outcome.reason.startswith("connection error (ConnectError"), outcome.retry_after) == (
        "retry", True, None)


def test_custom_headers_arrive_and_may_replace_the_defaults(sink: HttpSink) -> None:
    headers = {"Authorization": "Bearer s3cret", "X-Tenant": "t-1", "user-agent": "custom/1"}

    assert deliver(sink.url, contract_events(1), headers=headers) == [DELIVERED]
    [request] = sink.requests
    assert {name: request.headers[name] for name in ("Authorization", "X-Tenant", "User-Agent", "Content-Type")} == {
        "Authorization": "Bearer s3cret", "X-Tenant": "t-1", "User-Agent": "custom/1",
        "Content-Type": "application/json"}


def test_credentials_in_the_url_are_sent_as_basic_auth(sink: HttpSink) -> None:
    url = sink.url.replace("http://", "http://ann:p%40ss@") + "/in?tenant=1"

    assert deliver(url, contract_events(1)) == [DELIVERED]
    [request] = sink.requests
    assert (request.path, request.headers["Authorization"], request.headers["Host"]) == (
        "/in", "Basic " + base64.b64encode(b"ann:p@ss").decode(), sink.url.removeprefix("http://"))


@pytest.mark.parametrize("headers", [{"X-Tenant": "ü"}, {"X-Tenant": "a\r\nX-Evil: 1"}, {"Bad Name": "v"}])
def test_headers_http_cannot_carry_fail_at_construction(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="destination 'hook': header"):
        WebhookDestination("hook", WebhookOptions(url="http://127.0.0.1:9/in", headers=headers), 1)


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Connection"])
def test_framing_headers_cannot_be_configured(name: str) -> None:
    with pytest.raises(ValueError, match=f"header '{name}' is set by trackrelay"):
        WebhookDestination("hook", WebhookOptions(url="http://127.0.0.1:9/in", headers={name: "5"}), 1)


def test_no_more_requests_than_the_concurrency_are_in_flight(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(200, delay=0.2)

    assert deliver(sink.url, contract_events(8), concurrency=2) == [DELIVERED] * 8
    assert (len(sink.requests), sink.max_in_flight) == (8, 2)


def test_keep_alive_connections_carry_many_requests(sink: HttpSink) -> None:
    assert deliver(sink.url, contract_events(30), concurrency=3) == [DELIVERED] * 30
    assert len(sink.requests) == 30
    assert 1 <= len({r.client_port for r in sink.requests}) <= 3


def test_check_does_not_call_the_sink(sink: HttpSink) -> None:
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url), 1)

    assert asyncio.run(while_started(destination, lambda d: d.check())) is None
    assert sink.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/in", "not a url", "http://"])
def test_a_url_that_is_not_http_fails_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="destination 'hook'"):
        WebhookDestination("hook", WebhookOptions(url=url), 1)


@pytest.mark.parametrize(("batch_size", "settings", "problem"), [
    (0, {}, "batch_size must be at least 1 and timeout_seconds above 0"),
    (1, {"timeout_seconds": 0.0}, "batch_size must be at least 1 and timeout_seconds above 0"),
    (1, {"concurrency": 0}, 'concurrency must be "adaptive" or an integer of at least 1, got 0'),
    (1, {"concurrency": "fast"}, "concurrency must be \"adaptive\" or an integer of at least 1, got 'fast'"),
    (1, {"max_concurrency": 0}, "max_concurrency must be an integer of at least 1, got 0")])
def test_settings_out_of_range_fail_at_construction(batch_size: int, settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"destination 'hook': {problem}")):
        WebhookDestination("hook", WebhookOptions(url="http://127.0.0.1:9/in", **settings), batch_size)


def test_closing_answers_every_queued_request_with_a_retry_and_sends_none_of_them(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(200, delay=0.5)
    destination = WebhookDestination("hook", WebhookOptions(url=sink.url, concurrency=1), 1)

    async def scenario() -> list[Outcome]:
        await destination.start()
        delivering = asyncio.ensure_future(destination.deliver(contract_events(3)))
        await asyncio.sleep(0.2)  # the first request is at the sink, the other two queued
        await destination.close()
        return await asyncio.wait_for(delivering, 5)

    outcomes = asyncio.run(scenario())

    assert [(o.kind, o.reason) for o in outcomes] == [
        ("retry", "connection error (ClientClosed: the destination was closed during this request)"),
        ("retry", "connection error (ClientClosed: the destination was closed before this request was sent)"),
        ("retry", "connection error (ClientClosed: the destination was closed before this request was sent)")]
    assert len(sink.requests) <= 1
