"""Bodies that never finish are answered 408 and the connection closed, within the body
timeout or as soon as they fall below the minimum rate; a steady body, however slow, within
the limits is accepted. Raw sockets: the clients here misbehave on purpose."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RunningReceiver
from pipeline.store import Store, create_store_engine

TRACK = b'{"type": "track", "userId": "u1", "event": "Slow"}'
FAST = {"body_timeout_seconds": 2.0, "body_min_rate_bytes": 0, "body_rate_grace_seconds": 1.0}


def open_request(receiver: RunningReceiver, head: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
    conn.sendall(head)
    return conn


def read_answer(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the timeout)."""
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def post_head(length: str = "100", extra: bytes = b"") -> bytes:
    return (b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + (f"Content-Length: {length}\r\n".encode() if length else b"") + b"\r\n")


@pytest.mark.parametrize("case", ["short_body", "expect_continue", "silent_chunked"])
def test_a_body_that_never_finishes_gets_408_and_the_connection_closes(
        start_receiver: Callable[..., RunningReceiver], case: str) -> None:
    receiver = start_receiver(**FAST)
    head = {"short_body": post_head("100") + b'{"type": "track"',
            "expect_continue": post_head("100", b"Expect: 100-continue\r\n"),
            "silent_chunked": post_head("", b"Transfer-Encoding: chunked\r\n") + b"10\r\n{\"type\": \"track\"\r\n"}[case]
    started = time.monotonic()
    with open_request(receiver, head) as conn:
        answer = read_answer(conn)
    took = time.monotonic() - started
    assert b"HTTP/1.1 408 Request Timeout" in answer, answer
    assert b'"code":"request_timeout"' in answer and b"Connection: close" in answer
    assert 2.0 <= took < 5.0, took
    assert receiver.outbox() == []


def test_a_trickle_below_the_minimum_rate_is_cut_off(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(body_timeout_seconds=30.0, body_min_rate_bytes=50, body_rate_grace_seconds=1.0)
    started = time.monotonic()
    with open_request(receiver, post_head(str(len(TRACK)))) as conn:
        conn.settimeout(10)
        answer = b""
        for byte in TRACK:  # 5 bytes a second: far below 50
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - started > 4:
                break
        answer = read_answer(conn)
    assert b"408 Request Timeout" in answer
    assert time.monotonic() - started < 6


def test_a_slow_steady_body_within_the_limits_is_accepted(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(body_timeout_seconds=5.0, body_min_rate_bytes=10, body_rate_grace_seconds=1.0)
    with open_request(receiver, post_head(str(len(TRACK)))) as conn:
        for start in range(0, len(TRACK), 10):  # 10 bytes every 0.3 s: above the minimum
            conn.sendall(TRACK[start:start + 10])
            time.sleep(0.3)
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert len(receiver.outbox()) == 1


def test_timeouts_are_counted_into_one_rejected_row(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(**FAST)
    conns = [open_request(receiver, post_head("100") + b"{") for _ in range(3)]
    for conn in conns:
        with conn:
            assert b"408" in read_answer(conn)
    receiver.stop()
    store = Store(create_store_engine(receiver.config.database))
    try:
        rows: list[dict[str, Any]] = store.rows("rejected")
    finally:
        store.dispose()
    [row] = rows
    assert (row["code"], row["status"], row["route"], row["source"]) == ("request_timeout", 408, "track", None)
    assert row["reason"].startswith("3 request(s) that did not arrive in time")
