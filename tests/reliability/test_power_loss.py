"""Power loss is what SIGKILL cannot show: a killed process leaves its writes in the page
cache, a power cut loses what was not synced. No filesystem that drops unsynced writes can be
set up here (LazyFS is packaged neither by Debian nor on PyPI), so this shows the order that
makes a ``200`` survive one instead: a real ``trackrelay serve`` runs under ``strace``, and for
every request answered ``200`` the trace must show, in this order, the write of its row into
the SQLite WAL (found by its messageId in the page written), an ``fdatasync`` of the WAL
completed after that, and only then the ``HTTP/1.1 200`` written to that request's socket
(found by the client's port). A control run with ``sqlite_synchronous = "NORMAL"`` must fail
the same check, so it can fail.

On Postgres the sync is the server's: a commit returns once its WAL is flushed when
``synchronous_commit`` is on, which the receiver's sessions must not turn off (the worker's
do: what it commits may be redone).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from http_sink import HttpSink
from pipeline.config import DatabaseConfig
from pipeline.store import create_store_engine
from pipeline_harness import free_port
from reliability.outage_load import Trackrelay, run_command, wait_answering, write_config

REQUESTS = 120
CLIENTS = 4
SYSCALLS = "pwrite64,pwritev,write,writev,sendto,sendmsg,fdatasync,fsync"
# "12345 1796215037.862131 fdatasync(17</path/t.db-wal>) = 0", or split in two lines
# ("... <unfinished ...>", then "12345 <time> <... fdatasync resumed>) = 0") when threads interleave.
LINE = re.compile(r"^(?P<pid>\d+) +(?P<time>\d+\.\d+) (?P<rest>.*)$")
CALL = re.compile(r"^(?P<name>\w+)\((?P<fd>\d+)<(?P<path>[A-Z-]+:\[[^\]]*\]|[^>]*)>(?P<args>.*)$")
RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>")
SYNCS = ("fdatasync", "fsync")
WRITES = ("pwrite64", "pwritev", "write", "writev")
SENDS = ("sendto", "sendmsg", "write", "writev")


@dataclass
class Trace:
    """What a trace says about the WAL and the client sockets, in time order."""

    wal_writes: list[tuple[float, str]] = field(default_factory=list)  # (time, data written)
    wal_syncs: list[float] = field(default_factory=list)  # completion times
    answers: dict[int, tuple[float, str]] = field(default_factory=dict)  # client port: (time, first bytes)

    @classmethod
    def parse(cls, text: str) -> Trace:
        trace = cls()
        unfinished: dict[str, str] = {}  # pid: the sync waiting for its "resumed" line
        for line in text.splitlines():
            match = LINE.match(line)
            if match is None:
                continue  # "+++ exited", signals
            pid, at, rest = match["pid"], float(match["time"]), match["rest"]
            resumed = RESUMED.match(rest)
            if resumed is not None:
                if unfinished.pop(pid, None) == resumed["name"] and rest.endswith("= 0"):
                    trace.wal_syncs.append(at)
                continue
            call = CALL.match(rest)
            if call is None:
                continue
            name, path, args = call["name"], call["path"], call["args"]
            if path.endswith("-wal"):
                if name in SYNCS:
                    if args.endswith("<unfinished ...>"):
                        unfinished[pid] = name
                    elif args.endswith("= 0"):
                        trace.wal_syncs.append(at)
                elif name in WRITES:
                    trace.wal_writes.append((at, args))
            elif path.startswith("TCP:[") and name in SENDS and "HTTP/1.1 " in args:
                client_port = int(path.rsplit(":", 1)[1].rstrip("]"))
                trace.answers.setdefault(client_port, (at, args[args.index("HTTP/1.1 "):][:12]))
        return trace

    def unsynced(self, sent: list[tuple[str, int, int]]) -> tuple[list[str], list[float]]:
        """For each request answered 200 (messageId, client port, status): what is wrong with its
        order, if anything; and for the others, how long after the sync the answer was sent."""
        problems, gaps = [], []
        for message_id, port, status in sent:
            if status != 200:
                continue
            written = next((t for t, data in self.wal_writes if message_id in data), None)
            answered = self.answers.get(port)
            if written is None or answered is None or not answered[1].startswith("HTTP/1.1 200"):
                problems.append(f"{message_id}: row written at {written}, answer {answered}")
                continue
            synced = next((t for t in self.wal_syncs if t > written), None)
            if synced is None or synced > answered[0]:
                problems.append(f"{message_id}: written {written:.6f}, 200 sent {answered[0]:.6f}, "
                                f"first WAL sync after the write {synced}")
                continue
            gaps.append(answered[0] - synced)
        return problems, gaps


def post_once(port: int, message_id: str) -> tuple[str, int, int]:
    """One event on a connection of its own: (messageId, the client's port, the status)."""
    body = orjson.dumps({"userId": "u1", "event": "Power", "messageId": message_id})
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return message_id, client_port, int(answer.split(b" ", 2)[1])


def traced_serve(folder: Path, synchronous: str) -> tuple[Trace, list[tuple[str, int, int]], str]:
    """``trackrelay serve`` under strace, sent :data:`REQUESTS` events by :data:`CLIENTS` clients
    at once; the trace, what each request got, and the database URL."""
    strace = shutil.which("strace")
    assert strace is not None, "strace is needed (apt-get install strace)"
    folder.mkdir()
    url = f"sqlite:///{folder / 'trackrelay.db'}"
    port = free_port()
    sink = HttpSink()  # the config names a destination; the receiver alone never calls it
    try:
        config = write_config(folder, url, port, sink.url, synchronous=synchronous)
        run_command("migrate", config)
        trace_path = folder / "strace.txt"
        serve = Trackrelay("serve", config, folder / "serve.log",
                           [strace, "-f", "-ttt", "-yy", "-s", "65536", "--seccomp-bpf", "-e", f"trace={SYSCALLS}",
                            "-o", str(trace_path)])
        sent: list[tuple[str, int, int]] = []
        try:
            wait_answering(f"http://127.0.0.1:{port}", serve, timeout=60)

            def client(n: int) -> None:
                for i in range(REQUESTS // CLIENTS):
                    sent.append(post_once(port, f"power-{synchronous}-{n}-{i}-{port}"))

            threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            # SIGTERM to trackrelay itself (strace's child); strace ends with it.
            children = Path(f"/proc/{serve.popen.pid}/task/{serve.popen.pid}/children")
            for pid in children.read_text().split() if children.exists() else []:
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except ProcessLookupError:
                    pass
            assert serve.stop() == 0, serve.log[-3000:]
    finally:
        sink.stop()
    assert len(sent) == REQUESTS and all(status == 200 for _, _, status in sent), sorted({s for *_, s in sent})
    return Trace.parse(trace_path.read_text(encoding="utf-8", errors="replace")), sent, url


def test_every_200_is_sent_after_the_fdatasync_of_its_commit(tmp_path: Path,
                                                             figures: Callable[[str], None]) -> None:
    trace, sent, url = traced_serve(tmp_path / "full", "FULL")
    engine = create_store_engine(DatabaseConfig(url=url))
    try:
        with engine.connect() as conn:
            synchronous = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
            journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
    finally:
        engine.dispose()
    assert (synchronous, journal) == (2, "wal")  # FULL: the WAL is synced at every commit

    problems, gaps = trace.unsynced(sent)
    assert not problems, f"{len(problems)} of {REQUESTS} 200s not preceded by their WAL sync: {problems[:3]}"
    assert len(gaps) == REQUESTS
    figures(f"sqlite_synchronous=FULL (PRAGMA synchronous=2, WAL): {REQUESTS} 200s from {CLIENTS} clients, "
            f"each sent after an fdatasync of the WAL that followed its row's write; {len(trace.wal_syncs)} "
            f"fdatasyncs for {REQUESTS} requests (group commit); sync to answer {min(gaps) * 1e3:.2f}-"
            f"{max(gaps) * 1e3:.2f} ms")


def test_the_check_fails_when_commits_are_not_synced(tmp_path: Path, figures: Callable[[str], None]) -> None:
    """The control: with synchronous=NORMAL the WAL is synced only at checkpoints."""
    trace, sent, _ = traced_serve(tmp_path / "normal", "NORMAL")
    problems, _ = trace.unsynced(sent)
    assert len(problems) >= REQUESTS // 2, f"only {len(problems)} of {REQUESTS} 200s found unsynced"
    figures(f"sqlite_synchronous=NORMAL (control): {len(problems)} of {REQUESTS} 200s sent with no WAL sync "
            f"after their row's write ({len(trace.wal_syncs)} fdatasyncs in all)")


@pytest.mark.postgres
def test_the_receivers_postgres_commits_wait_for_the_wal_flush(postgres_url: str,
                                                               figures: Callable[[str], None]) -> None:
    settings = {}
    for role, at_least_once in (("receiver", False), ("worker", True)):
        engine = create_store_engine(DatabaseConfig(url=postgres_url), at_least_once=at_least_once)
        try:
            with engine.connect() as conn:
                settings[role] = tuple(conn.execute(sa.text(f"SHOW {name}")).scalar_one()
                                       for name in ("synchronous_commit", "fsync", "wal_sync_method"))
        finally:
            engine.dispose()
    assert settings["receiver"][:2] == ("on", "on"), settings
    assert settings["worker"][0] == "off", settings
    figures(f"Postgres: receiver sessions synchronous_commit={settings['receiver'][0]} fsync="
            f"{settings['receiver'][1]} wal_sync_method={settings['receiver'][2]}; worker sessions "
            f"synchronous_commit={settings['worker'][0]}")
