"""Hostile clients against a real ``trackrelay serve`` process: idle keep-alives past the
descriptor limit, slowloris heads, stalled bodies plain and gzip, long URLs and wide pixel
queries. Throughout, a normal client keeps being served, and the process's descriptors,
memory and log stay bounded. Each test prints what it measured.
"""

from __future__ import annotations

import gzip
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from pipeline_harness import free_port
from reliability.outage_load import Trackrelay, run_command, wait_answering

GIF_MAGIC = b"GIF89a"


class Receiver:
    """``trackrelay serve`` on its own SQLite file, under a lowered descriptor limit, with what
    /proc says of it."""

    def __init__(self, folder: Path, nofile: int, settings: str = "") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = folder / "trackrelay.toml"
        config.write_text(f'[database]\nurl = "sqlite:///{folder}/t.db"\n[receiver]\nport = {self.port}\n{settings}\n'
                          '[[destinations]]\nname = "null"\ntype = "null"\n')
        run_command("migrate", config)
        # prlimit executes the command in its own process: the pid is the receiver's.
        self.process = Trackrelay("serve", config, folder / "receiver.log", ["prlimit", f"--nofile={nofile}:{nofile}"])
        wait_answering(self.base, self.process)

    def proc(self, name: str) -> str:
        return Path(f"/proc/{self.process.popen.pid}/{name}").read_text()

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.popen.pid}/fd"))

    def rss_mb(self) -> float:
        for line in self.proc("status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = self.proc("stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_bytes(self) -> int:
        return self.process.log_path.stat().st_size


@pytest.fixture
def receiver_at(tmp_path: Path) -> Iterator:
    started: list[Receiver] = []

    def start(nofile: int = 1024, settings: str = "") -> Receiver:
        started.append(Receiver(tmp_path, nofile, settings))
        return started[-1]

    yield start
    for receiver in started:
        receiver.process.stop()


def served_ms(base: str, samples: int) -> list[float]:
    """A normal client: one event per new connection; every answer must be 200."""
    times = []
    for i in range(samples):
        began = time.monotonic()
        answer = httpx.post(base + "/v1/track", json={"userId": "normal", "event": f"e{i}"}, timeout=5)
        assert answer.status_code == 200, answer.text
        times.append((time.monotonic() - began) * 1000)
    return times


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def within_bound(receiver: Receiver) -> float:
    """The p99 a normal client must keep to under attack: 50 ms, or four times what it measures with
    no attack on this (possibly busy) machine, whichever is more."""
    return max(50.0, 4 * p99(served_ms(receiver.base, 20)))


def connect(port: int, count: int, first_bytes: bytes = b"", keepalive_request: bool = False) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if keepalive_request:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        elif first_bytes:
            sock.sendall(first_bytes)
        held.append(sock)
    return held


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None if the connection is still open."""
    sock.settimeout(0.2)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except (TimeoutError, socket.timeout):
        return None if not got else got
    except ConnectionResetError:
        return got


def test_idle_keepalives_past_the_descriptor_limit(receiver_at, figures) -> None:
    """600 keep-alives against 256 descriptors: the longest idle make room, the normal client
    is served throughout, the process neither spins nor floods its log."""
    receiver = receiver_at(nofile=256)
    bound = within_bound(receiver)
    cpu_before, log_before = receiver.cpu_seconds(), receiver.log_bytes()
    held = []
    for _ in range(6):  # 100 at a time, a normal client in between
        held += connect(receiver.port, 100, keepalive_request=True)
        served_ms(receiver.base, 2)
    times = served_ms(receiver.base, 50)
    fds = receiver.descriptors()
    open_now = sum(1 for sock in held if closed_by_server(sock) is None)
    cpu = receiver.cpu_seconds() - cpu_before
    log_growth = receiver.log_bytes() - log_before
    figures(f"keep-alives opened=600 still_open={open_now} descriptors={fds}/256 normal_p99={p99(times):.1f}ms (bound {bound:.0f}) "
            f"cpu={cpu:.2f}s log_growth={log_growth}B")
    assert fds <= 256 and open_now <= 256 - 16
    assert p99(times) < bound
    assert log_growth < 20_000
    for sock in held:
        sock.close()


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(receiver_at, figures) -> None:
    """max_connections set past what 128 descriptors allow: accept() fails with EMFILE. The
    receiver pauses accepting, closes the longest-idle keep-alive to free a descriptor, and logs
    a line a second at most; every client is served in the end (before: 99% CPU, a traceback
    per attempt, clients timing out)."""
    receiver = receiver_at(nofile=128, settings="max_connections = 1000")
    cpu_before, began = receiver.cpu_seconds(), time.monotonic()
    held = connect(receiver.port, 150, keepalive_request=True)  # each must be answered 200
    times = served_ms(receiver.base, 10)
    elapsed, cpu = time.monotonic() - began, receiver.cpu_seconds() - cpu_before
    lines = receiver.process.log.count("event=out_of_descriptors")
    figures(f"descriptors=128 max_connections=1000: 150 keep-alives all answered in {elapsed:.1f} s, "
            f"out_of_descriptors lines={lines}, cpu={cpu:.2f}s, descriptors={receiver.descriptors()}, "
            f"normal_p99={p99(times):.1f}ms")
    assert 1 <= lines <= elapsed + 2
    assert "Traceback" not in receiver.process.log
    assert cpu < 0.5 * elapsed + 1
    for sock in held:
        sock.close()


def test_new_connections_past_max_connections_get_503(receiver_at, figures) -> None:
    """Heads that are arriving are not idle: past max_connections, a new connection is answered
    503 with Retry-After at once, never left to wait or spin."""
    receiver = receiver_at(settings="max_connections = 50\nheader_timeout_seconds = 30")
    held = connect(receiver.port, 50, first_bytes=b"POST /v1/track HTTP/1.1\r\n")
    time.sleep(3)  # all 50 accepted and registered, on a busy machine too
    extra = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
    extra.settimeout(10)
    answer = extra.recv(65536)
    figures(f"max_connections=50 held=50 heads arriving, the 51st answered {answer.split(b' ', 2)[1].decode()}")
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer
    assert b'"code":"too_many_connections"' in answer
    for sock in held + [extra]:
        sock.close()


def test_slowloris_heads_are_answered_408(receiver_at, figures) -> None:
    """300 heads sent a line at a time and never finished: each answered 408 after
    header_timeout_seconds, while idle connections with nothing sent stay until their own
    (longer) timeout and a normal client is served all along."""
    receiver = receiver_at(settings="header_timeout_seconds = 2\nidle_timeout_seconds = 30")
    bound = within_bound(receiver)
    slow = connect(receiver.port, 300, first_bytes=b"POST /v1/track HTTP/1.1\r\nHost: t\r\n")
    idle = connect(receiver.port, 20, keepalive_request=True)
    began = time.monotonic()
    times = []
    while time.monotonic() - began < 4:
        times += served_ms(receiver.base, 5)
        for sock in slow[:50]:
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # a trickle keeps coming: the head still times out
            except OSError:
                pass
        time.sleep(0.2)
    answers = [closed_by_server(sock) for sock in slow]
    timed_out = sum(1 for answer in answers if answer is not None and answer.startswith(b"HTTP/1.1 408"))
    idle_open = sum(1 for sock in idle if closed_by_server(sock) is None)
    figures(f"slowloris heads=300 answered_408={timed_out} idle_keepalives_still_open={idle_open}/20 "
            f"normal_p99={p99(times):.1f}ms (bound {bound:.0f})")
    assert timed_out == 300
    assert idle_open == 20
    assert p99(times) < bound
    for sock in slow + idle:
        sock.close()


def stalled_body(port: int, body: bytes, encoding: str | None) -> socket.socket:
    """A batch whose Content-Length promises 100 KB more than the body sent (within the limit)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST /v1/batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 100_000}\r\n")
    if encoding:
        head += f"Content-Encoding: {encoding}\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_stalled_bodies_hold_bounded_memory(receiver_at, figures, encoding) -> None:
    """500 connections each send part of a batch and stall. Plain: each sent 20 KB; gzip: each
    sent 663 bytes that inflate to 500 KB. The receiver holds what was sent, not what it
    inflates to (target: at most 5 MB per 100 stalled connections), and gives the memory back
    once they go."""
    receiver = receiver_at(settings="body_timeout_seconds = 120\nbody_min_rate_bytes = 0")
    if encoding == "gzip":
        inflated = b"{\"batch\": [" + b" " * 400_000
        body = gzip.compress(inflated, 9)
    else:
        body = b'{"batch": [' + b'{"type": "track", "userId": "u", "event": "e"},' * 420
    bound = within_bound(receiver)
    rss_before = receiver.rss_mb()
    held = [stalled_body(receiver.port, body, encoding) for _ in range(500)]
    time.sleep(7)  # stalled: the body sweep (once a second) lets inflaters go after 2 s, then trims
    times = served_ms(receiver.base, 50)
    rss_stalled = receiver.rss_mb()
    for sock in held:
        sock.close()
    time.sleep(6.5)  # the body sweep gives the memory back within a second or two
    rss_after = receiver.rss_mb()
    per_100 = (rss_stalled - rss_before) / 5
    figures(f"stalled bodies={500} encoding={encoding or 'identity'} sent_each={len(body)}B "
            f"rss {rss_before:.0f} -> {rss_stalled:.0f} -> {rss_after:.0f} MB (+{per_100:.1f} MB per 100) "
            f"normal_p99={p99(times):.1f}ms (bound {bound:.0f})")
    assert per_100 <= 5.0  # issue 12's target (it was 53 MB per 100 gzip, 800x what was sent)
    assert rss_after - rss_before <= 10
    assert p99(times) < bound


def test_long_urls_get_414_and_wide_pixel_queries_the_gif(receiver_at, figures) -> None:
    receiver = receiver_at()
    # httpx refuses to send a URL this long: a raw socket does.
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/pixel/track?data=" + b"A" * 70_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        long_url = httpx.Response(int(sock.recv(12)[9:12]), content=b"")
        rest = b""
        while b"}" not in rest:
            rest += sock.recv(65536)
        long_url = httpx.Response(long_url.status_code, content=rest.split(b"\r\n\r\n", 1)[1])
    fields = "&".join(f"properties.f{i}=v" for i in range(5000))
    wide = httpx.get(receiver.base + "/v1/pixel/track?userId=u&event=e&" + fields[:30_000], timeout=10)
    many = httpx.get(receiver.base + "/v1/pixel/track?" + "&".join(["a=1"] * 5000), timeout=10)
    figures(f"70 KB URL -> {long_url.status_code}; 5,000-field pixel queries -> {wide.status_code} "
            f"{wide.headers.get('content-type')}, {many.status_code} {many.headers.get('content-type')}")
    assert long_url.status_code == 414
    assert orjson.loads(long_url.content)["code"] == "uri_too_long"
    for answer in (wide, many):
        assert answer.status_code == 200 and answer.content.startswith(GIF_MAGIC)
    assert served_ms(receiver.base, 3)
