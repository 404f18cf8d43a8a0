"""The console's live stream (GET /api/live, receiver/admin/live.py): events as they are
accepted and each delivery's outcome, filtered; a reader that cannot keep up is dropped."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from conftest import unique_id
from console_harness import RunningConsole, with_console
from http_sink import Answer
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook
from receiver.admin import live


class Stream:
    """An SSE client on a thread: every (event, data) it read."""

    def __init__(self, url: str, params: dict[str, str]) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.open = threading.Event()
        self._stop = False
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._read, args=(url, params), daemon=True)
        self._thread.start()
        assert self.open.wait(10), "the stream did not open"

    def _read(self, url: str, params: dict[str, str]) -> None:
        try:
            self._messages(url, params)
        except httpx.HTTPError as exc:  # the console stopping ends the stream mid-chunk
            self.error = exc

    def _messages(self, url: str, params: dict[str, str]) -> None:
        with httpx.Client(timeout=httpx.Timeout(30, read=60)) as client:
            with client.stream("GET", url + "/api/live", params=params) as answer:
                assert answer.headers["Content-Type"].startswith("text/event-stream")
                self.open.set()
                kind = None
                for line in answer.iter_lines():
                    if self._stop:
                        return
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind:
                        self.messages.append((kind, orjson.loads(line[6:])))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for k, m in list(self.messages) if k == kind]

    def stop(self) -> None:
        self._stop = True


@pytest.fixture
def pipeline(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> Pipeline:
    sink.decide = lambda n, r: Answer(500) if r.path == "/bad" else Answer()
    return start_pipeline([webhook(sink.url + "/good", name="good"),
                           # A retry a second later: the stream samples states every poll, and
                           # a retry shorter than a poll may show only as its outcome.
                           webhook(sink.url + "/bad", name="bad", max_attempts=2, retry_initial_seconds=1.0,
                                   retry_max_seconds=1.0)])


def test_events_appear_as_accepted_then_delivered_retried_or_dead(pipeline: Pipeline) -> None:
    running = RunningConsole(with_console(pipeline.config))
    try:
        tracks, everything = Stream(running.url, {"type": "track"}), Stream(running.url, {})
        good_only = Stream(running.url, {"destination": "good"})
        time.sleep(0.3)  # a poll after the readers joined fixes where the stream starts
        sent = [pipeline.receiver.post("/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()})
                for _ in range(3)]
        assert all(a.status_code == 200 for a in sent)
        identify = unique_id()
        pipeline.receiver.post("/v1/identify", {"userId": "u", "messageId": identify})
        wait_for(lambda: len(everything.of("dead")) == 4 and len(everything.of("delivered")) == 4,
                 "every outcome on the unfiltered stream")
        wait_for(lambda: len(tracks.of("dead")) == 3 and len(good_only.of("delivered")) == 4, "the filtered streams")
        assert {m["type"] for m in tracks.of("accepted")} == {"track"} and len(tracks.of("accepted")) == 3
        assert identify in {m["message_id"] for m in everything.of("accepted")}
        accepted = everything.of("accepted")[0]
        assert accepted["payload"]["messageId"] == accepted["message_id"]
        assert sorted(accepted["destinations"]) == ["bad", "good"]
        assert {m["destination"] for m in everything.of("retrying")} == {"bad"}
        assert all(m["attempts"] == 2 and "500" in m["last_error"] for m in everything.of("dead"))
        assert good_only.of("dead") == [] and good_only.of("retrying") == []
        # an event's accepted line comes before its outcomes
        order = [(k, m["message_id"]) for k, m in everything.messages]
        for message_id in {m["message_id"] for m in everything.of("delivered")}:
            assert order.index(("accepted", message_id)) < order.index(("delivered", message_id))
        for stream in (tracks, everything, good_only):
            assert stream.error is None
            stream.stop()
    finally:
        running.stop()


def test_a_reader_that_cannot_keep_up_is_dropped_and_ingest_goes_on(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(live, "QUEUE_MESSAGES", 5)
    caplog.set_level(logging.INFO, logger="trackrelay.console")
    running = RunningConsole(with_console(pipeline.config))
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", running.port))
        stalled.sendall(b"GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_for(lambda: running.ctx.live.readers, "the reader to join")
        time.sleep(0.3)
        for _ in range(60):  # one poll publishes more than five messages at once
            assert pipeline.receiver.post("/v1/track", {"userId": "u", "event": "E",
                                                        "messageId": unique_id()}).status_code == 200
        wait_for(lambda: not running.ctx.live.readers, "the reader to be dropped")
        assert "event=live_reader_dropped reason=queue_full" in caplog.text
        stalled.settimeout(10)
        received = b""
        while chunk := stalled.recv(65536):  # the server ends the stream
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        stalled.close()
        wait_for(lambda: pipeline.db.settled(120) or pipeline.db.outbox_pending() == 0, "ingest to go on")
        assert len(pipeline.db.events()) == 60
    finally:
        running.stop()
