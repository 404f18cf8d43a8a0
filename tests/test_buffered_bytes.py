"""max_buffered_bytes: bodies still arriving hold at most this many bytes in one process; a
body that would take it past the cap is answered 503 with Retry-After (counted, not recorded
one by one), and once the held bodies go, bodies are taken again. Compressed bodies count what
was sent, not what they inflate to."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Callable

import httpx

from conftest import RunningReceiver
from test_body_timeouts import read_answer

CAP = {"max_call_bytes": 15360, "max_batch_bytes": 40_000, "max_buffered_bytes": 60_000}
PART = b'{"batch": [' + b'{"type": "track", "userId": "u", "event": "e"},' * 500  # 24 KB


def stalled(receiver: RunningReceiver, sent: bytes, length: int, encoding: str = "") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
    head = f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
    if encoding:
        head += f"Content-Encoding: {encoding}\r\n"
    conn.sendall(head.encode() + b"\r\n" + sent)
    return conn


def test_a_body_past_the_cap_gets_503_and_bodies_are_taken_again_once_held_ones_go(
        start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(**CAP)
    first = stalled(receiver, PART, 39_000)
    second = stalled(receiver, PART, 39_000)
    time.sleep(0.5)  # both held: 48 KB of 60
    third = stalled(receiver, PART, 39_000)  # would make 72 KB
    answer = read_answer(third)
    assert b"HTTP/1.1 503 Service Unavailable" in answer, answer
    assert b"Retry-After: " in answer and b'"code":"buffers_full"' in answer
    first.close()
    second.close()
    time.sleep(0.5)
    batch = {"batch": [{"type": "track", "userId": "u", "event": "after"}]}
    taken = httpx.post(f"http://127.0.0.1:{receiver.port}/v1/batch", json=batch, timeout=10)
    assert taken.status_code == 200, taken.text
    assert len(receiver.outbox()) == 1


def test_compressed_bodies_count_what_was_sent_not_what_they_inflate_to(
        start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(**CAP)
    # Each inflates to 35 KB (within the batch limit), and is some 300 bytes as sent: ten of
    # them stalled are far below the cap, where ten inflated would be six times past it.
    inflated = b'{"batch": [' + b" " * 35_000
    sent = gzip.compress(inflated)
    held = [stalled(receiver, sent, len(sent) + 100, "gzip") for _ in range(10)]
    time.sleep(0.5)
    batch = {"batch": [{"type": "track", "userId": "u", "event": "beside"}]}
    taken = httpx.post(f"http://127.0.0.1:{receiver.port}/v1/batch", json=batch, timeout=10)
    assert taken.status_code == 200, taken.text
    for conn in held:
        conn.settimeout(0.2)
        try:
            assert conn.recv(100) == b"", "a held body was answered"
        except TimeoutError:
            pass  # still open, still held: as it should be
        conn.close()
