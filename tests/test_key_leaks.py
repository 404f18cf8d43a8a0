"""No write key where it should not be: not in Tornado's own log lines about a header it cannot
parse, not in the answer or the rejected record of a webhook whose ?writeKey= is not UTF-8."""

from __future__ import annotations

import base64
import io
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import RunningReceiver
from pipeline.logs import FORMAT, CredentialFilter
from pipeline_harness import Process, Processes, wait_for

KEY = "Sup3rSecretKey"
ENCODED = base64.b64encode(f"{KEY}:".encode()).decode()


def formatted(logger: str, message: str, *args: object) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(CredentialFilter())
    record = logging.getLogger(logger).makeRecord(logger, logging.INFO, __file__, 1, message, args, None)
    handler.handle(record)
    return out.getvalue()


def test_the_filter_takes_out_tornados_header_values_and_credentials() -> None:
    line = formatted("tornado.general", "Malformed HTTP message from %s: %s", "127.0.0.1",
                     f"Invalid header value 'Basic {ENCODED}\\x01'")
    assert ENCODED not in line and "Malformed HTTP message from 127.0.0.1: Invalid header value [not logged" in line
    line = formatted("somelib", "sent Authorization: Bearer %s, then Basic %s;", "tok.en-1", ENCODED)
    assert "tok.en-1" not in line and ENCODED not in line
    assert "Bearer [redacted], then Basic [redacted];" in line
    assert formatted("trackrelay", "event=started role=%s", "receiver").endswith("event=started role=receiver\n")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Process, int]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = Processes(tmp_path)
    process = processes.start("run", "--database-url", f"sqlite:///{tmp_path / 't.db'}", "--port", str(port),
                              "--log-level", "DEBUG")
    process.wait_for_log("event=started role=receiver")
    yield process, port
    processes.kill_leftovers()


def test_a_malformed_authorization_header_leaves_no_key_in_the_log(served: tuple[Process, int]) -> None:
    process, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Authorization: Basic " + ENCODED.encode() + b"\x01\r\n\r\n{}")
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400")
    wait_for(lambda: "Malformed HTTP message" in process.log, "Tornado's line about the bad header")
    assert ENCODED not in process.log and KEY not in process.log
    assert "Invalid header value [not logged" in process.log


@pytest.mark.parametrize("query", [f"writeKey={KEY}%ff", f"writeKey=%ff{KEY}"])
def test_a_webhook_key_that_is_not_utf8_is_not_echoed(receiver: RunningReceiver, query: str) -> None:
    response = receiver.post(f"/v1/webhook?{query}", {"userId": "u1", "type": "track", "event": "x"})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_write_key")
    assert KEY not in response.text
    [row] = receiver.rejected()
    assert KEY not in row["reason"] and row["code"] == "invalid_write_key"


def test_served_answers_still_work(served: tuple[Process, int]) -> None:
    _, port = served
    response = httpx.post(f"http://127.0.0.1:{port}/v1/track", json={"userId": "u1", "event": "x"},
                          headers={"Authorization": f"Basic {ENCODED}"})
    assert response.status_code == 200
