"""Real ``trackrelay`` processes to SIGKILL, and the load they are killed under.

:class:`Server` starts ``trackrelay run`` or ``serve`` (a :class:`pipeline_harness.Process`,
from a TOML file that ``pipeline_harness.write_config`` wrote) on a free loopback port, waits
for ``/health``, and reads the pids of the processes it forked from its log, so a test can
SIGKILL one of them. :class:`Load` is a set of concurrent clients sending single events and
small batches, each with fresh messageIds, as fast as they can, recording which messageIds got
a ``200`` and which were sent and never answered. The sink that counts deliveries is
tests/http_sink.py behind ``pipeline_harness.ScriptedSink``; the database is read through
``pipeline_harness.Database``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import sqlalchemy as sa

from pipeline.schema import deliveries, outbox
from pipeline_harness import Database, Process, Processes, free_port, wait_for

START_SECONDS = 60.0  # a start on a loaded 2-core machine, migrations included
STARTED = re.compile(r"pid=(\d+) .*event=started role=(receiver|worker)")



def started_processes(folder: Path) -> Iterator[Processes]:
    """Body of a ``processes`` fixture: whatever a test started is SIGKILLed at its end."""
    processes = Processes(folder)
    try:
        yield processes
    finally:
        processes.kill_leftovers()


def started_pids(process: Process, role: str) -> list[int]:
    """Pids that logged ``event=started role=<role>`` in ``process``'s log, in order."""
    return [int(pid) for pid, found in STARTED.findall(process.log) if found == role]


def wait_started(process: Process, role: str, count: int = 1) -> list[int]:
    def found() -> list[int] | None:
        assert process.popen.poll() is None, f"trackrelay exited {process.popen.returncode}:\n{process.log}"
        pids = started_pids(process, role)
        return pids if len(pids) >= count else None
    return wait_for(found, f"{count} started {role}(s)", START_SECONDS)


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


class Server:
    """``trackrelay run|serve --config FILE --port PORT [flags]`` on one port, started again
    after each kill."""

    def __init__(self, processes: Processes, command: str, config: Path, *flags: str) -> None:
        self.processes, self.command, self.config, self.flags = processes, command, config, flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.current: Process | None = None

    def start(self, receivers: int = 1) -> Process:
        """Start it and wait until ``receivers`` receivers started and ``/health`` answers 200."""
        process = self.processes.start(self.command, "--config", str(self.config), "--port", str(self.port),
                                       *self.flags)
        self.current = process
        wait_started(process, "receiver", receivers)
        wait_for(lambda: self._healthy(process), f"{self.command} to answer /health", START_SECONDS)
        return process

    def _healthy(self, process: Process) -> bool:
        assert process.popen.poll() is None, f"trackrelay exited {process.popen.returncode}:\n{process.log}"
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


JSON = {"Content-Type": "application/json"}


def request_for(ids: list[str], client: int) -> tuple[str, bytes]:
    """A single ``/v1/track`` for one id, a ``/v1/batch`` for more."""
    messages = [{"type": "track", "event": "Kill Test", "userId": f"client-{client}", "messageId": i} for i in ids]
    if len(ids) == 1:
        return "/v1/track", orjson.dumps(messages[0])
    return "/v1/batch", orjson.dumps({"batch": messages})


class Load:
    """``clients`` threads, each its own keep-alive ``httpx.Client``, sending request after
    request of ``sizes[n % len(sizes)]`` messages until :meth:`stop`.

    ``acked``: messageIds answered 200. ``declined``: answered otherwise (a stopping receiver
    answers 503). ``unanswered``: sent (the connection was made) but no answer came: each may
    or may not be stored. ``refused``: connections refused (nothing sent; the server was
    down). ``statuses``: every answer's status; ``without_retry_after``: 503s lacking one.
    """

    def __init__(self, url: str, clients: int = 8, sizes: tuple[int, ...] = (1, 3), timeout: float = 30.0) -> None:
        self.url, self.clients, self.sizes, self.timeout = url, clients, sizes, timeout
        self.acked: set[str] = set()
        self.declined: set[str] = set()
        self.unanswered: set[str] = set()
        self.refused = 0
        self.without_retry_after = 0
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)
        assert not any(t.is_alive() for t in self._threads), "a load client did not stop"

    @property
    def sent(self) -> set[str]:
        return self.acked | self.declined | self.unanswered

    def wait_acked(self, more: int, timeout: float = 60.0) -> None:
        """Wait until ``more`` messageIds more than now got their 200."""
        target = len(self.acked) + more
        wait_for(lambda: len(self.acked) >= target, f"{more} more acknowledged messages", timeout)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            n = 0
            while not self._stop.is_set():
                ids = [uuid.uuid4().hex for _ in range(self.sizes[n % len(self.sizes)])]
                n += 1
                path, body = request_for(ids, index)
                try:
                    response = client.post(path, content=body, headers=JSON)
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    with self._lock:
                        self.refused += 1
                    time.sleep(0.02)  # down: do not spin while it restarts
                    continue
                except httpx.TransportError:
                    with self._lock:
                        self.unanswered.update(ids)
                    continue
                with self._lock:
                    self.statuses[response.status_code] += 1
                    (self.acked if response.status_code == 200 else self.declined).update(ids)
                    if response.status_code == 503 and "Retry-After" not in response.headers:
                        self.without_retry_after += 1


def message_ids(body: bytes) -> list[str]:
    decoded = json.loads(body)
    return [m["messageId"] for m in decoded["batch"]] if "batch" in decoded else [decoded["messageId"]]


def stored_message_ids(db: Database) -> list[str]:
    """The messageIds of every request the receiver committed to the outbox (one per message)."""
    with db.engine.connect() as conn:
        return [i for (body,) in conn.execute(sa.select(outbox.c.body).order_by(outbox.c.id))
                for i in message_ids(body)]


def delivery_states(db: Database) -> Counter[str]:
    """How many deliveries are in each state: one cheap query, fit to poll during a drain."""
    query = sa.select(deliveries.c.state, sa.func.count()).group_by(deliveries.c.state)
    with db.engine.connect() as conn:
        return Counter({state: count for state, count in conn.execute(query)})


def all_delivered(db: Database, count: int) -> bool:
    """The outbox is decoded and its ``count`` deliveries (one destination) are all delivered."""
    return db.outbox_pending() == 0 and delivery_states(db) == {"delivered": count}
