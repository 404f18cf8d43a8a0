"""The segment adapter forwarding to a real trackrelay receiver (both backends) and a real sink."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import RunningReceiver
from http_sink import Answer, HttpSink
from outage import store_down
from pipeline.destinations.base import DELIVERED, Event, Outcome, rejected, retry
from pipeline.destinations.contract import contract_events, while_started
from pipeline.destinations.segment import SegmentDestination, SegmentOptions

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    running = HttpSink()
    yield running
    running.stop()


def forward(url: str, events: list[Event], write_key: str = "k1", batch_size: int = 100,
            **options: Any) -> list[Outcome]:
    destination = SegmentDestination("seg", SegmentOptions(url=url, write_key=write_key, **options), batch_size)
    return asyncio.run(while_started(destination, lambda d: d.deliver(events)))


def stored_batches(receiver: RunningReceiver) -> list[tuple[str, str | None, Any]]:
    return [(row["source"], row["auth_key"], json.loads(row["body"])) for row in receiver.outbox()]


def test_events_arrive_in_the_receivers_outbox_as_one_batch_of_the_source(start_receiver: Any) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]})
    events = contract_events(5)

    assert forward(receiver.url, events) == [DELIVERED] * 5
    [(source, auth_key, body)] = stored_batches(receiver)
    assert (source, auth_key, sorted(body)) == ("fwd", "k1", ["batch", "sentAt", "writeKey"])
    assert (body["writeKey"], ISO_MS.fullmatch(body["sentAt"]) is not None) == ("k1", True)
    # Each event is forwarded as it was, sent now: the receiving end corrects clock skew with it.
    assert body["batch"] == [{**event, "sentAt": body["sentAt"]} for event in events]
    assert receiver.rejected() == []


def test_each_chunk_of_batch_size_is_one_request(start_receiver: Any) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]})
    events = contract_events(7)

    assert forward(receiver.url + "/", events, batch_size=3) == [DELIVERED] * 7
    stored = [tuple(e["messageId"] for e in body["batch"]) for _, _, body in stored_batches(receiver)]
    assert (len(stored), set(stored)) == (3, {tuple(e["messageId"] for e in events[i:i + 3]) for i in (0, 3, 6)})


def test_gzip_bodies_are_accepted_by_the_receiver(start_receiver: Any) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]})
    events = contract_events(4)

    assert forward(receiver.url, events, gzip=True) == [DELIVERED] * 4
    [(source, _, body)] = stored_batches(receiver)
    assert (source, [e["messageId"] for e in body["batch"]]) == ("fwd", [e["messageId"] for e in events])


def test_gzip_on_sends_a_gzip_body_to_v1_batch_with_basic_auth(sink: HttpSink) -> None:
    events = contract_events(2)

    assert forward(sink.url + "/base/", events, write_key="wk-ü", gzip=True) == [DELIVERED] * 2
    [request] = sink.requests
    assert (request.path, request.headers["Content-Encoding"], request.headers["Content-Type"]) == (
        "/base/v1/batch", "gzip", "application/json")
    assert request.headers["Authorization"] == "Basic " + base64.b64encode("wk-ü:".encode()).decode()
    assert [e["messageId"] for e in request.json()["batch"]] == [e["messageId"] for e in events]


@pytest.mark.parametrize("partial_status", [207, 200])
def test_an_invalid_event_is_rejected_with_the_receivers_message_and_the_rest_delivered(
        start_receiver: Any, partial_status: int) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]}, partial_success_status=partial_status)
    events = contract_events(3)
    events[1] = {**events[0], "messageId": "no-event", "event": None}

    assert forward(receiver.url, events) == [
        DELIVERED, rejected(f"HTTP {partial_status}: Missing event (track needs an event name)"), DELIVERED]
    [(_, _, body)] = stored_batches(receiver)
    assert len(body["batch"]) == 3  # the receiver keeps the request; its pipeline skips the bad one


def test_a_wrong_write_key_rejects_every_event(start_receiver: Any) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]})

    assert forward(receiver.url, contract_events(3), write_key="nope") == [
        rejected("HTTP 400: Invalid or missing writekey")] * 3
    assert receiver.outbox() == []


def test_a_refusal_of_the_whole_request_rejects_every_event(start_receiver: Any) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]}, max_batch_bytes=1000)

    outcomes = forward(receiver.url, contract_events(4))
    assert [(o.kind, o.reason.startswith("HTTP 413: ")) for o in outcomes] == [("rejected", True)] * 4
    assert receiver.outbox() == []


def test_a_receiver_without_its_store_is_retried_after_its_retry_after(
        start_receiver: Any, database_url: str) -> None:
    receiver = start_receiver(sources={"fwd": ["k1"]}, lock_timeout_seconds=0.3)

    with store_down(database_url):
        outcomes = forward(receiver.url, contract_events(2))
    assert [(o.kind, o.retry_after) for o in outcomes] == [("retry", 5.0)] * 2
    assert outcomes[0].reason.startswith("HTTP 503: ")


def test_a_400_blaming_some_items_rejects_them_and_sends_the_others_again(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(400, json.dumps({"Success": False, "Errors": [
        {"Index": 1, "Message": "Invalid event", "Details": "too long"}]}).encode())

    assert forward(sink.url, contract_events(3)) == [
        retry("HTTP 400: sent in a batch with rejected events"), rejected("HTTP 400: Invalid event (too long)"),
        retry("HTTP 400: sent in a batch with rejected events")]


def test_a_400_with_an_error_of_the_whole_request_rejects_every_item(sink: HttpSink) -> None:
    body = json.dumps({"Errors": [{"Index": 0, "Message": "bad"}, {"Message": "Invalid JSON"}]})
    sink.answers = lambda _: Answer(400, body.encode())

    assert forward(sink.url, contract_events(2)) == [rejected(f"HTTP 400: {body}")] * 2


def test_a_2xx_without_readable_errors_delivers_every_item(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(200, b"OK, not JSON")

    assert forward(sink.url, contract_events(2)) == [DELIVERED] * 2


def test_errors_with_an_index_outside_the_chunk_are_ignored_on_a_2xx(sink: HttpSink) -> None:
    sink.answers = lambda _: Answer(207, b'{"Errors": [{"Index": 5, "Message": "x"}, {"Index": true}]}')

    assert forward(sink.url, contract_events(2)) == [DELIVERED] * 2


def test_a_2xx_whose_body_cannot_be_read_delivers_every_item_and_says_so(
        sink: HttpSink, caplog: pytest.LogCaptureFixture) -> None:
    # A gzip body that does not inflate: the client keeps the status and marks the body truncated.
    sink.answers = lambda _: Answer(207, b"not gzip at all", {"Content-Encoding": "gzip"})

    with caplog.at_level("WARNING", logger="trackrelay.destinations.segment"):
        assert forward(sink.url, contract_events(2)) == [DELIVERED] * 2
    [warning] = [r.getMessage() for r in caplog.records if r.name == "trackrelay.destinations.segment"]
    assert warning.startswith("event=answer_truncated destination=") and "status=207 events=2" in warning
