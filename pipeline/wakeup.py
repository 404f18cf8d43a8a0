"""Waking the worker when the receiver commits, across processes, so events do not wait for
the next poll (two 0.1 s polls in a row would put the median latency near 100 ms).

- Postgres: a statement trigger on ``outbox`` (migration 0003) runs ``pg_notify``, delivered
  when the receiver's transaction commits; the worker LISTENs on a dedicated connection.
- SQLite: after a commit the receiver sends one datagram to a Unix socket in the abstract
  namespace named after the database file; the worker is bound to it.

A lost signal costs nothing but latency: the worker still polls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from sqlalchemy.engine import make_url

from pipeline.store import normalise_url

log = logging.getLogger("trackrelay.wakeup")

CHANNEL = "trackrelay_outbox"


def sqlite_address(url: str) -> str | None:
    """The abstract Unix socket name for a SQLite database URL (None for other backends)."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    digest = hashlib.sha256(os.path.realpath(parsed.database).encode()).hexdigest()[:24]
    return f"\0trackrelay-{digest}"


class SqliteSignal:
    """The receiver's side on SQLite: one non-blocking datagram per commit."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def send(self) -> None:
        try:
            self._socket.sendto(b"!", self.address)
        except OSError:
            pass  # no worker listening, or its buffer is full: it will poll

    def close(self) -> None:
        self._socket.close()


def outbox_signal(url: str) -> SqliteSignal | None:
    address = sqlite_address(url)
    return SqliteSignal(address) if address else None


class SqliteListener:
    """The worker's side on SQLite: calls ``on_signal`` on the event loop for each burst."""

    def __init__(self, address: str, on_signal: Callable[[], None]) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._socket.bind(address)
        self._on_signal = on_signal
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._socket.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self._socket.recv(64):
                pass
        except BlockingIOError:
            pass
        self._on_signal()

    def close(self) -> None:
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()


class PostgresListener:
    """The worker's side on Postgres: LISTEN on a dedicated connection in a thread."""

    def __init__(self, url: str, on_signal: Callable[[], None]) -> None:
        self._url = make_url(normalise_url(url))
        self._on_signal = on_signal
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trackrelay-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        dsn = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._loop.call_soon_threadsafe(self._on_signal)
            except Exception as exc:  # the database is away: poll meanwhile, listen again later
                if not self._stop.is_set():
                    log.warning("event=listen_failed error=%r", str(exc).splitlines()[0][:200])
                    self._stop.wait(2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_listener(url: str, on_signal: Callable[[], None]) -> SqliteListener | PostgresListener | None:
    """Listen for the receiver's commit signals (call from the worker's event loop)."""
    backend = make_url(normalise_url(url)).get_backend_name()
    try:
        if backend == "postgresql":
            return PostgresListener(url, on_signal)
        address = sqlite_address(url)
        return SqliteListener(address, on_signal) if address else None
    except OSError as exc:
        log.warning("event=listen_failed error=%r", str(exc))
        return None
