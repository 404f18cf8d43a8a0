"""Helpers for the pipeline's end-to-end and fault tests: a TOML config written to disk, the
worker in a thread or as a real ``trackrelay`` process, a scripted HTTP sink, and the
delivery rows read back from the database.

Every wait polls a condition with a deadline; nothing sleeps a fixed time and then asserts.
"""

from __future__ import annotations

import socket
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from conftest import RunningReceiver
from http_sink import Answer, HttpSink, Recorded
from pipeline.config import Config, DatabaseConfig, load_config
from pipeline.schema import deliveries, events, outbox
from pipeline.store import create_store_engine
from pipeline.worker import Worker

SCRIPT = Path(sys.executable).with_name("trackrelay")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "receiver"]
WAIT_SECONDS = 30.0
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# Fast everything: a retry after 50-200 ms, an idle tick every 50 ms, a 2 s lease.
FAST_WORKER = {"poll_interval_seconds": 0.05, "lease_seconds": 2, "reaper_interval_seconds": 0.5}
_runs = itertools.count()

# The console's default port is fixed (8089): trackrelay processes started by tests run
# without it (conftest sets this for every test; helpers that start trackrelay with a clean
# environment keep it), so that two at once do not collide. The console's tests set their own.
CONSOLE_OFF = ("TRACKRELAY_ADMIN_PORT", "0")


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick), for a server a test starts itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def errors_on_threads(work: Callable[[Any], None], each: Sequence[Any]) -> list[BaseException]:
    """``work(item)`` for every item, each on its own thread, all at once; what they raised."""
    errors: list[BaseException] = []

    def guarded(item: Any) -> None:
        try:
            work(item)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(item,)) for item in each]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


# --- configuration ---------------------------------------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def webhook(url: str, name: str = "hook", **settings: Any) -> dict[str, Any]:
    """A ``[[destinations]]`` table for a webhook with fast retries."""
    return {"name": name, "type": "webhook", "url": url, "retry_initial_seconds": 0.05,
            "retry_max_seconds": 0.2, **settings}


def write_config(path: Path, database_url: str, destinations: Sequence[dict[str, Any]],
                 sources: Sequence[dict[str, Any]] = (), worker: dict[str, Any] | None = None,
                 receiver: dict[str, Any] | None = None) -> Path:
    """Write a trackrelay TOML file; the worker settings default to :data:`FAST_WORKER`."""
    lines = ['log_level = "INFO"', "", "[database]", f"url = {_toml(database_url)}", "", "[worker]"]
    lines += [f"{k} = {_toml(v)}" for k, v in {**FAST_WORKER, **(worker or {})}.items()]
    if receiver:
        lines += ["", "[receiver]"] + [f"{k} = {_toml(v)}" for k, v in receiver.items()]
    for table, name in [(s, "sources") for s in sources] + [(d, "destinations") for d in destinations]:
        lines += ["", f"[[{name}]]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_config(path: Path) -> Config:
    return load_config(path, env={})


# --- the worker --------------------------------------------------------------------------------

class ThreadWorker:
    """The real :class:`Worker` on its own event loop in a thread, stopped by :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        self.worker = Worker(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.worker.start()
            except BaseException as exc:
                self._error = exc
                ready.set()
                await self.worker.stop(timeout=5)
                return
            ready.set()
            await self._stop.wait()
            await self.worker.stop(timeout=10)

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(WAIT_SECONDS), "worker did not start"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_SECONDS)
        assert not self._thread.is_alive(), "worker did not stop"


class Process:
    """One real ``trackrelay`` process in its own process group; stderr (the log) in a file."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        run = next(_runs)
        self.stderr_path = cwd / f"trackrelay-{run}.stderr"
        self.stdout_path = cwd / f"trackrelay-{run}.stdout"
        with open(self.stderr_path, "wb") as stderr, open(self.stdout_path, "wb") as stdout:
            self.popen = subprocess.Popen(COMMAND + args, cwd=cwd, env=dict(os.environ), stdout=stdout,
                                          stderr=stderr, start_new_session=True)

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    @property
    def output(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        return self.popen.wait(timeout)

    def wait_for_log(self, pattern: str) -> str:
        def found() -> str | None:
            match = re.search(pattern, self.log)
            if match is None:
                assert self.popen.poll() is None, f"trackrelay exited {self.popen.returncode}:\n{self.log}"
            return match.group(0) if match else None
        return wait_for(found, f"{pattern!r} in the log")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the process and any children it forked (``run`` forks receiver and worker)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(WAIT_SECONDS)


class Processes:
    """Processes started by a test; whatever is still running at the end is killed."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[Process] = []

    def start(self, *args: str) -> Process:
        process = Process(list(args), self.cwd)
        self.started.append(process)
        return process

    def run(self, *args: str) -> Process:
        """Start a command and wait (bounded) for it to exit."""
        process = self.start(*args)
        process.wait()
        return process

    def kill_leftovers(self) -> None:
        for process in self.started:
            process.kill_group()


# --- the sink ----------------------------------------------------------------------------------

def event_ids(recorded: Recorded) -> list[str]:
    """The messageIds a webhook request carried: one event, or a ``{"batch": [...]}``."""
    body = recorded.json()
    return [e["messageId"] for e in body["batch"]] if "batch" in body else [body["messageId"]]


class ScriptedSink:
    """An :class:`HttpSink` whose answers come from ``decide(n, request)`` (n counts from 0),
    with every answer it gave recorded next to the request's messageIds."""

    def __init__(self, sink: HttpSink, decide: Callable[[int, Recorded], Answer] | None = None) -> None:
        self.sink = sink
        self.url = sink.url
        self.decide: Callable[[int, Recorded], Answer] = decide or (lambda n, r: Answer())
        self.answered: list[tuple[Recorded, list[str], Answer]] = []
        sink.answers = self._answer

    def _answer(self, recorded: Recorded) -> Answer:
        answer = self.decide(len(self.answered), recorded)
        self.answered.append((recorded, event_ids(recorded), answer))
        return answer

    def events(self, path: str | None = None, status: int = 200, delayed: bool | None = None) -> list[dict[str, Any]]:
        """Events of the requests answered ``status`` (on ``path``; held back or not)."""
        found = []
        for recorded, _, answer in list(self.answered):
            if answer.status != status or (path is not None and recorded.path != path):
                continue
            if delayed is not None and bool(answer.delay) != delayed:
                continue
            body = recorded.json()
            found += body["batch"] if "batch" in body else [body]
        return found

    def counts(self, path: str | None = None, status: int = 200, delayed: bool | None = None) -> Counter[str]:
        """How many times each messageId was answered ``status``."""
        return Counter(e["messageId"] for e in self.events(path, status, delayed))

    def requests_for(self) -> Counter[str]:
        """How many requests carried each messageId, whatever the answer."""
        return Counter(i for _, ids, _ in list(self.answered) for i in ids)


# --- the database ------------------------------------------------------------------------------

class Database:
    """Read the pipeline's tables of a test database."""

    def __init__(self, url: str) -> None:
        self.engine = create_store_engine(DatabaseConfig(url=url))

    def deliveries(self, destination: str | None = None) -> list[dict[str, Any]]:
        query = (sa.select(deliveries, events.c.message_id, events.c.source)
                 .join(events, events.c.id == deliveries.c.event_id).order_by(deliveries.c.id))
        if destination is not None:
            query = query.where(deliveries.c.destination == destination)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def events(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.select(events).order_by(events.c.id))]

    def outbox_pending(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(outbox)
                                .where(outbox.c.state == "pending")).scalar_one()

    def settled(self, expected: int) -> bool:
        """The outbox is decoded and ``expected`` deliveries exist, none of them pending."""
        if self.outbox_pending():
            return False
        rows = self.deliveries()
        return len(rows) == expected and all(r["state"] != "pending" for r in rows)

    def states(self, destination: str | None = None) -> Counter[str]:
        return Counter(r["state"] for r in self.deliveries(destination))

    def dispose(self) -> None:
        self.engine.dispose()


# --- receiver and worker together --------------------------------------------------------------

@dataclass
class Pipeline:
    config_path: Path
    config: Config
    receiver: RunningReceiver
    worker: ThreadWorker
    db: Database


class Pipelines:
    """Start a pipeline (config file, receiver and worker thread) on a test database; stop all."""

    def __init__(self, database_url: str, directory: Path) -> None:
        self.database_url = database_url
        self.directory = directory
        self.started: list[Pipeline] = []

    def start(self, destinations: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]] = ()) -> Pipeline:
        path = write_config(self.directory / "trackrelay.toml", self.database_url, destinations, sources)
        config = read_config(path)
        receiver = RunningReceiver(config)
        try:
            worker = ThreadWorker(config)
        except BaseException:
            receiver.stop()
            raise
        self.started.append(Pipeline(path, config, receiver, worker, Database(self.database_url)))
        return self.started[-1]

    def stop_all(self) -> None:
        for pipeline in self.started:
            try:
                pipeline.worker.stop()
            finally:
                pipeline.receiver.stop()
                pipeline.db.dispose()
