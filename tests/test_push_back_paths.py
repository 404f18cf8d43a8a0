"""Push-back and its error paths, against real loopback servers and real stores: a Retry-After
pauses the webhook destination (nothing is sent, and the claim side claims nothing, until it is
over), a connection closed without an answer cuts the adaptive limit, a worker whose controller
rows cannot be written keeps delivering and stops cleanly, and how a ``concurrency`` read as a
string (the environment's and the flags' path through ``_convert``) becomes a word or a number.

No timed assertions: a pause is read from ``pause_seconds()`` and waited out by polling."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import typing
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from http_sink import Answer, HttpSink, Recorded
from pipeline.config import ConfigError, DestinationConfig, _convert, load_config
from pipeline.delivery import DestinationRunner
from pipeline.destinations.base import DELIVERED
from pipeline.destinations.concurrency import INITIAL_LIMIT
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions
from pipeline.queue import DeliveryQueue
from pipeline.schema import delivery_controllers
from pipeline.store import Store
from pipeline_harness import Database, ScriptedSink, ThreadWorker, read_config, wait_for, webhook, write_config
from stored_rows import add_delivery, add_event, opened_store, outbox_row, rows

PAUSE = 2  # the Retry-After the sinks answer, in seconds


@pytest.fixture
def plain_sink() -> Iterator[HttpSink]:
    running = HttpSink()
    yield running
    running.stop()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


def track(message_id: str) -> dict[str, str]:
    return {"type": "track", "event": "E", "userId": "u1", "messageId": message_id}


def push_back_once(status: int, retry_after: Any) -> Any:
    """Answers for a sink: ``status`` with ``Retry-After`` (a value, or a callable giving one at
    answer time) to the first request, 200 to the others."""
    answered: list[Recorded] = []

    def answer(request: Recorded) -> Answer:
        answered.append(request)
        if len(answered) > 1:
            return Answer(200)
        value = retry_after() if callable(retry_after) else retry_after
        return Answer(status, b"slow down", {"Retry-After": value})
    return answer


async def pause_over(destination: WebhookDestination, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while destination.pause_seconds() > 0:
        assert time.monotonic() < deadline, "the pause never ended"
        await asyncio.sleep(0.05)


# --- 1. Retry-After pauses the destination ------------------------------------------------------


def http_date_in(seconds: float) -> str:
    return format_datetime(datetime.now(timezone.utc) + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(("status", "retry_after", "most"), [
    (429, str(PAUSE), PAUSE), (503, str(PAUSE), PAUSE),
    # An HTTP-date has whole seconds: "3 s from now" is 2 to 3 s from when it is read.
    (429, lambda: http_date_in(PAUSE + 1), PAUSE + 1)], ids=["429", "503", "429-http-date"])
def test_retry_after_pauses_sending_until_it_is_over(plain_sink: HttpSink, status: int, retry_after: Any,
                                                      most: float) -> None:
    plain_sink.answers = push_back_once(status, retry_after)
    destination = WebhookDestination("hook", WebhookOptions(url=plain_sink.url), 1)

    async def main() -> None:
        await destination.start()
        try:
            [first] = await destination.deliver([track("m0")])
            assert (first.kind, first.reason) == ("retry", f"HTTP {status}: slow down")
            assert first.retry_after is not None and 0 < first.retry_after <= most
            paused = destination.pause_seconds()
            assert 0 < paused <= most

            held = await destination.deliver([track("m1"), track("m2")])
            still_paused = destination.pause_seconds()
            # Not sent at all: the sink saw only the first request.
            assert len(plain_sink.requests) == 1
            assert still_paused > 0  # so the two above were refused during the pause
            assert [o.kind for o in held] == ["retry", "retry"]
            assert all(o.reason.startswith("not sent: the destination asked to wait ") for o in held)
            assert all(o.retry_after is not None and 0 < o.retry_after <= most for o in held)

            await pause_over(destination)
            assert await destination.deliver([track("m1"), track("m2")]) == [DELIVERED] * 2
        finally:
            await destination.close()

    asyncio.run(main())
    assert [body["messageId"] for body in plain_sink.bodies()][0] == "m0"
    assert sorted(body["messageId"] for body in plain_sink.bodies()[1:]) == ["m1", "m2"]


def test_a_push_back_without_retry_after_does_not_pause(plain_sink: HttpSink) -> None:
    plain_sink.answers = lambda _: Answer(429, b"no")
    destination = WebhookDestination("hook", WebhookOptions(url=plain_sink.url), 1)

    async def main() -> float:
        await destination.start()
        try:
            await destination.deliver([track("m0")])
            await destination.deliver([track("m1")])
            return destination.pause_seconds()
        finally:
            await destination.close()

    assert asyncio.run(main()) == 0
    assert len(plain_sink.requests) == 2  # both sent


# --- 2. the claim side waits while the destination is paused -----------------------------------


def test_no_claim_is_made_while_paused_and_the_deliveries_go_once_it_is_over(
        plain_sink: HttpSink, store: Store) -> None:
    plain_sink.answers = push_back_once(429, str(PAUSE))
    options = WebhookOptions(url=plain_sink.url)
    destination = WebhookDestination("hook", options, 1)
    config = DestinationConfig(name="hook", type="webhook", options=options, batch_size=1, claim_size=10)
    runner = DestinationRunner(config, destination, DeliveryQueue(store, "runner"), lease_seconds=30)

    def states() -> list[tuple[str, int, bool]]:
        return [(r["state"], r["attempts"], r["locked_by"] is not None) for r in rows(store, "deliveries")]

    async def main() -> tuple[list[tuple[str, int, bool]], int]:
        await destination.start()
        try:
            [pushed_back] = await destination.deliver([track("first")])  # outside the runner
            assert pushed_back.kind == "retry" and destination.pause_seconds() > 0
            for i in range(3):
                await asyncio.to_thread(add_delivery, store, add_event(store, f"m{i}"))
            draining = asyncio.ensure_future(runner.drain(lambda: False))
            await asyncio.sleep(0.5)  # the lanes' turn to claim, were they not waiting
            during = await asyncio.to_thread(states)
            assert destination.pause_seconds() > 0, "the pause ended before the rows were read"
            assert len(plain_sink.requests) == 1
            tried = await asyncio.wait_for(draining, 30)
            return during, tried
        finally:
            await destination.close()

    during, tried = asyncio.run(main())
    # While paused: due, unclaimed, untried.
    assert during == [("pending", 0, False)] * 3
    # After it: claimed once and delivered.
    assert tried == 3
    assert states() == [("delivered", 1, False)] * 3
    assert sorted(body["messageId"] for body in plain_sink.bodies()) == ["first", "m0", "m1", "m2"]


def test_a_stopping_worker_is_not_held_by_a_pause(plain_sink: HttpSink, store: Store) -> None:
    """A Retry-After of an hour: drain still ends as soon as the worker stops, claiming nothing."""
    plain_sink.answers = push_back_once(503, "3600")
    options = WebhookOptions(url=plain_sink.url)
    destination = WebhookDestination("hook", options, 1)
    config = DestinationConfig(name="hook", type="webhook", options=options, batch_size=1, claim_size=10)
    runner = DestinationRunner(config, destination, DeliveryQueue(store, "runner"), lease_seconds=30)
    add_delivery(store, add_event(store, "m0"))
    stopping = threading.Event()

    async def main() -> int:
        await destination.start()
        try:
            await destination.deliver([track("first")])
            assert destination.pause_seconds() > 3000
            draining = asyncio.ensure_future(runner.drain(stopping.is_set))
            await asyncio.sleep(0.3)
            stopping.set()
            return await asyncio.wait_for(draining, 10)  # the pause is slept in steps of 1 s at most
        finally:
            await destination.close()

    assert asyncio.run(main()) == 0
    assert [(r["state"], r["attempts"], r["locked_by"]) for r in rows(store, "deliveries")] == [("pending", 0, None)]


# --- 3. a connection closed without an answer is push-back --------------------------------------


class UnansweringServer:
    """A loopback TCP server that reads each request and then closes the connection without
    an answer, or first writes ``reply`` (bytes that are not HTTP)."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/in"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                if self.reply:
                    conn.sendall(self.reply)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()


def deliver_once(destination: WebhookDestination, batch: list[dict[str, Any]]) -> list[Any]:
    """Start the destination, deliver one batch, close it; the batch's outcomes."""
    async def main() -> list[Any]:
        await destination.start()
        try:
            return await destination.deliver(batch)
        finally:
            await destination.close()
    return asyncio.run(main())


@pytest.mark.parametrize(("reply", "error"), [
    (b"", "ConnectionClosed: server closed the connection without answering"),
    (b"SMTP ready\r\n\r\n", "RemoteProtocolError: not an HTTP/1.x answer")], ids=["closed", "garbage"])
def test_a_connection_closed_without_an_answer_is_retried_and_cuts_the_adaptive_limit(reply: bytes,
                                                                                       error: str) -> None:
    server = UnansweringServer(reply)
    destination = WebhookDestination("hook", WebhookOptions(url=server.url, concurrency="adaptive"), 1)
    before = destination.controller.snapshot()

    try:
        [outcome] = deliver_once(destination, [track("m0")])
    finally:
        server.stop()
    after = destination.controller.snapshot()

    assert server.connections == 1  # a new connection closed unanswered is not sent again
    assert (outcome.kind, outcome.retry_after) == ("retry", None)
    # The reason names the error's class, a public one (no private _Closed in last_error).
    assert outcome.reason.startswith(f"connection error ({error}"), outcome.reason
    assert (before.mode, before.limit, before.cuts, before.back_pressure) == ("adaptive", INITIAL_LIMIT, 0, 0)
    # The first cut halves (slow start overshoots); the push-back is counted; no pause.
    assert (after.limit, after.cuts, after.back_pressure, after.in_flight) == (INITIAL_LIMIT // 2, 1, 1, 0)
    assert destination.pause_seconds() == 0


def test_with_a_fixed_concurrency_the_protocol_error_is_counted_and_the_limit_stays() -> None:
    server = UnansweringServer()
    destination = WebhookDestination("hook", WebhookOptions(url=server.url, concurrency=3), 1)

    try:
        [outcome] = deliver_once(destination, [track("m0")])
    finally:
        server.stop()
    snapshot = destination.controller.snapshot()
    assert outcome.kind == "retry"
    assert (snapshot.mode, snapshot.limit, snapshot.cuts, snapshot.back_pressure) == ("fixed", 3, 0, 1)


# --- 4. the worker's controller rows cannot be written ------------------------------------------


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_a_worker_whose_controller_rows_cannot_be_written_keeps_delivering_and_stops_cleanly(
        tmp_path: Path, database_url: str, store: Store, sink: ScriptedSink,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = read_config(write_config(tmp_path / "trackrelay.toml", database_url, [webhook(sink.url)]))
    db = Database(database_url)
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")

    def published() -> list[Any]:
        with admin.connect() as conn:
            return conn.execute(sa.select(delivery_controllers.c.destination, delivery_controllers.c.mode)).all()

    try:
        worker = ThreadWorker(config)
        try:
            assert wait_for(published, "the controller row") == [("hook", "adaptive")]
            # The table goes away under the running worker: every publish from now on fails
            # as a statement on a missing table does (no retry makes it work again).
            with admin.connect() as conn:
                conn.execute(sa.text("DROP TABLE delivery_controllers"))
            wait_for(lambda: messages(caplog, "event=job_failed job=controllers"), "the publish to fail")
            store.append([outbox_row(track(f"m{i}"), "track") for i in range(5)])
            wait_for(lambda: db.states("hook") == {"delivered": 5}, "the deliveries after the failure")
        finally:
            worker.stop()  # asserts the worker's thread ended
    finally:
        db.dispose()
        admin.dispose()

    assert sorted(sink.counts()) == [f"m{i}" for i in range(5)]
    failed = messages(caplog, "event=job_failed job=controllers")
    assert 1 <= len(failed) <= 2, [r.getMessage() for r in failed]  # one line per 30 s, not one per tick
    assert "delivery_controllers" in failed[0].getMessage()
    [withdrawn] = messages(caplog, "event=controllers_not_withdrawn")
    assert (withdrawn.name, withdrawn.levelname) == ("trackrelay.worker", "WARNING")
    assert "delivery_controllers" in withdrawn.getMessage()
    assert messages(caplog, "event=stopped role=worker")
    # No other job failed because of it.
    assert [r.getMessage() for r in messages(caplog, "event=job_failed")
            if "job=controllers" not in r.getMessage()] == []


# --- 5. concurrency as a string: the environment's and the flags' path --------------------------


# WebhookOptions.concurrency: int | str (the hint _build_section passes for this key).
CONCURRENCY_HINT = typing.get_type_hints(WebhookOptions)["concurrency"]


@pytest.mark.parametrize(("raw", "expected"), [("adaptive", "adaptive"), ("32", 32), (" 32 ", 32)])
def test_concurrency_from_a_string_is_the_word_or_the_number(raw: str, expected: Any) -> None:
    value = _convert("TRACKRELAY_X_CONCURRENCY", raw, CONCURRENCY_HINT, True)
    assert (value, type(value)) == (expected, type(expected))


def test_from_a_file_a_quoted_number_stays_a_string_and_the_adapter_names_the_key(tmp_path: Path) -> None:
    """Only the environment and flags turn "32" into 32 (a TOML string is meant as one); the
    word that is not "adaptive" fails at start-up, naming the destination and the key."""
    assert _convert("[[destinations]] hook concurrency", "32", CONCURRENCY_HINT, False) == "32"
    path = tmp_path / "trackrelay.toml"
    path.write_text('[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:9/in"\n'
                    'concurrency = "fast"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="destination 'hook': concurrency must be \"adaptive\" or an integer "
                                          "of at least 1, got 'fast'"):
        load_config(path, env={})
