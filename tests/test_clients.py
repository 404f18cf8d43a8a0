"""The real client libraries against a running receiver: what they send lands in the outbox.

segment-analytics-python 2.4 (body ``writeKey`` and Basic auth, gzip optional) and
rudder-sdk-python 2.1 (Basic auth only, gzip by default) each get a ``Client`` instance pointed
at the receiver. A response hook on each library's own ``requests`` session records every
exchange as it went over the wire, so that the outbox can be compared with the exact bytes the
client sent, and every retry the client makes is counted.
"""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from rudderstack.analytics import request as rudder_request
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics import request as segment_request
from segment.analytics.client import Client as SegmentClient

pytestmark = pytest.mark.clients

WRITE_KEY = "ILoveData123"
ClientFactory = Callable[..., "Sender"]


@dataclass
class Sender:
    """One real client, the errors it reported through ``on_error``, and what it put on the wire."""

    client: Any
    library: str
    errors: list[Exception] = field(default_factory=list)
    wire: list[requests.Response] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)

    def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        ok, message = getattr(self.client, method)(message_id=uuid.uuid4().hex, **kwargs)
        assert ok, f"{self.library} refused to queue {method}"
        self.sent.append(message)
        return message

    def send_each_call_type(self, user_id: str) -> None:
        self.call("identify", user_id=user_id, traits={"plan": "pro"})
        self.call("track", user_id=user_id, event="Signed Up", properties={"n": 1})
        self.call("page", user_id=user_id, category="Docs", name="Install")
        self.call("screen", user_id=user_id, name="Home")
        self.call("group", user_id=user_id, group_id="g-" + user_id, traits={"name": "ACME"})
        self.call("alias", previous_id="anon-" + user_id, user_id=user_id)

    def send_as_one_batch(self, calls: list[tuple[str, dict[str, Any]]]) -> None:
        """Queue every call before the consumer starts, so that they go out as ONE request."""
        for method, kwargs in calls:
            self.call(method, **kwargs)
            self.client.queue.put(self.sent[-1])
        self.client.consumers[0].start()
        self.client.flush()

    def request_bodies(self) -> list[bytes]:
        """The request bodies as the client sent them, decompressed where it gzipped them."""
        bodies = []
        for response in self.wire:
            body = response.request.body
            if response.request.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            bodies.append(body if isinstance(body, bytes) else body.encode())
        return bodies

    def expected_messages(self) -> dict[str, dict[str, Any]]:
        """The queued messages by messageId, as the library serialises them."""
        return {m["messageId"]: json.loads(json.dumps(m, default=str)) for m in self.sent}


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """``make_client(library, url, **options)``: a client instance, stopped at the end of the test."""
    senders: list[Sender] = []
    hooks: list[tuple[requests.Session, Callable[..., None]]] = []

    def make(library: str, url: str, *, write_key: str = WRITE_KEY, start: bool = True,
             **options: Any) -> Sender:
        cls, session = {"segment": (SegmentClient, segment_request._session),
                        "rudder": (RudderClient, rudder_request._session)}[library]
        sender = Sender(client=None, library=library)

        def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            sender.wire.append(response)

        session.hooks["response"].append(record)
        hooks.append((session, record))
        # Small retry budget and timeouts: a retry the client should not make shows up at once
        # as an extra request, and nothing here can hang for long.
        settings = {"max_retries": 2, "timeout": 5, "upload_interval": 0.2}
        settings.update(options)
        # send=False builds the consumer without starting it (and without an atexit hook);
        # the test then starts it itself (see Sender.send_as_one_batch).
        sender.client = cls(write_key, host=url, send=start,
                            on_error=lambda error, batch: sender.errors.append(error), **settings)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.client.join()
    for session, record in hooks:
        session.hooks["response"].remove(record)


def outbox_messages(receiver: Any) -> dict[str, dict[str, Any]]:
    """Every message stored in the outbox, by messageId (route "batch" only)."""
    found = {}
    for row in receiver.outbox():
        assert row["route"] == "batch"
        for message in json.loads(row["body"])["batch"]:
            found[message["messageId"]] = message
    return found


def basic_auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


DELIVERIES = [
    pytest.param("segment", {"gzip": True}, id="segment-gzip"),
    pytest.param("segment", {"gzip": False}, id="segment-plain"),
    pytest.param("rudder", {}, id="rudder-gzip-default"),
    pytest.param("rudder", {"gzip": False}, id="rudder-plain"),
]


@pytest.mark.parametrize(("library", "options"), DELIVERIES)
def test_every_call_type_is_in_the_outbox_as_sent(receiver: Any, make_client: ClientFactory,
                                                  library: str, options: dict[str, Any]) -> None:
    sender = make_client(library, receiver.url, **options)
    sender.send_each_call_type("user-" + uuid.uuid4().hex)
    sender.client.flush()

    assert sender.errors == []
    assert [r.status_code for r in sender.wire] == [200] * len(sender.wire)
    gzipped = options.get("gzip", True)
    assert {r.request.headers.get("Content-Encoding") for r in sender.wire} == {"gzip" if gzipped else None}
    expected = sender.expected_messages()
    assert {m["type"] for m in expected.values()} == {"identify", "track", "page", "screen", "group", "alias"}
    assert outbox_messages(receiver) == expected

    rows = receiver.outbox()
    # One row per request, holding exactly the bytes the client sent (decompressed).
    assert [row["body"] for row in rows] == sender.request_bodies()
    for row in rows:
        body = json.loads(row["body"])
        assert row["source"] == "default"
        assert row["auth_key"] == WRITE_KEY
        assert row["user_agent"].startswith("analytics-python/")
        assert isinstance(body["sentAt"], str)
        if library == "segment":
            assert body["writeKey"] == WRITE_KEY
        else:
            assert "writeKey" not in body


@pytest.mark.parametrize("library", ["segment", "rudder"])
def test_closed_mode_accepts_the_client_write_key(start_receiver: Callable[..., Any],
                                                  make_client: ClientFactory, library: str) -> None:
    receiver = start_receiver(sources={"web": [WRITE_KEY]})
    sender = make_client(library, receiver.url)
    sender.send_each_call_type("user-" + uuid.uuid4().hex)
    sender.client.flush()

    assert sender.errors == []
    assert {r.request.headers["Authorization"] for r in sender.wire} == {basic_auth(WRITE_KEY)}
    assert outbox_messages(receiver) == sender.expected_messages()
    assert {row["source"] for row in receiver.outbox()} == {"web"}
    assert receiver.rejected() == []


@pytest.mark.parametrize("library", ["segment", "rudder"])
def test_wrong_write_key_is_reported_once_and_not_retried(start_receiver: Callable[..., Any],
                                                          make_client: ClientFactory, library: str) -> None:
    receiver = start_receiver(sources={"web": [WRITE_KEY]})
    sender = make_client(library, receiver.url, write_key="not-a-key", max_retries=3)
    sender.call("track", user_id="u-" + uuid.uuid4().hex, event="Signed Up")
    sender.client.flush()

    assert [r.status_code for r in sender.wire] == [400]
    assert sender.wire[0].json() == {
        "Success": False,
        "Errors": [{"Error": "Bad Request", "Message": "Invalid or missing writekey", "Details": "",
                    "Index": 0, "code": "invalid_write_key"}],
        "code": "invalid_write_key", "message": "Invalid or missing writekey"}
    assert len(sender.errors) == 1
    error = sender.errors[0]
    assert (error.status, error.code, error.message) == (400, "invalid_write_key", "Invalid or missing writekey")
    assert receiver.outbox() == []
    rejected = receiver.rejected()
    assert [(r["route"], r["status"], r["code"]) for r in rejected] == [("batch", 400, "invalid_write_key")]


PARTIAL_BATCH: list[tuple[str, dict[str, Any]]] = [
    ("identify", {"user_id": "u-partial", "traits": {"plan": "pro"}}),
    # Both clients let an empty event name through (they only check it is a string).
    ("track", {"user_id": "u-partial", "event": ""}),
]


@pytest.mark.parametrize("library", ["segment", "rudder"])
def test_partial_success_answered_200_is_success_for_the_client(start_receiver: Callable[..., Any],
                                                                make_client: ClientFactory,
                                                                library: str) -> None:
    receiver = start_receiver(partial_success_status=200)
    sender = make_client(library, receiver.url, start=False)
    sender.send_as_one_batch(PARTIAL_BATCH)

    assert sender.errors == []
    assert [r.status_code for r in sender.wire] == [200]
    body = sender.wire[0].json()
    assert (body["Success"], body["code"]) == (False, "partial_success")
    assert [(e["Index"], e["code"]) for e in body["Errors"]] == [(1, "missing_event")]
    assert [row["body"] for row in receiver.outbox()] == sender.request_bodies()


def test_segment_24_takes_a_207_as_success(receiver: Any, make_client: ClientFactory) -> None:
    sender = make_client("segment", receiver.url, start=False)
    sender.send_as_one_batch(PARTIAL_BATCH)

    assert sender.errors == []
    assert [r.status_code for r in sender.wire] == [207]
    assert len(receiver.outbox()) == 1


def test_rudder_resends_a_207_and_reports_it(receiver: Any, make_client: ClientFactory) -> None:
    """Why ``partial_success_status = 200`` exists: rudder-sdk-python retries any non-200 but 4xx."""
    sender = make_client("rudder", receiver.url, start=False, max_retries=1)
    sender.send_as_one_batch(PARTIAL_BATCH)

    assert [r.status_code for r in sender.wire] == [207, 207]
    assert [(e.status, e.code) for e in sender.errors] == [(207, "partial_success")]
    assert len(receiver.outbox()) == 2
