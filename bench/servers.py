"""Starting the servers every figure uses: ``trackrelay serve``/``worker`` with a written TOML
config, the hello-world ceiling and the sink. Each is ready (listening, or logged as started)
when its function returns."""

from __future__ import annotations

import itertools
import json
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.databases import Database
from bench.messages import SOURCE, WRITE_KEY
from bench.processes import SERVER_CPUS, TRACKRELAY, Process, free_port, log_time

_names = itertools.count()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def write_config(workdir: Path, database: Database, port: int | None = None, synchronous: str = "FULL",
                 destinations: tuple[Mapping[str, Any], ...] = (), worker: Mapping[str, Any] | None = None) -> Path:
    """A closed-mode config (one source, one write key) for trackrelay on ``database``."""
    lines = ['log_level = "INFO"', "[database]", f"url = {_toml_value(database.url)}",
             f"sqlite_synchronous = {_toml_value(synchronous)}", "[receiver]", 'host = "127.0.0.1"',
             f"port = {port or 8088}", "[worker]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in (worker or {}).items()]
    lines += ["[[sources]]", f"name = {_toml_value(SOURCE)}", f"write_keys = [{_toml_value(WRITE_KEY)}]"]
    for destination in destinations:
        lines.append("[[destinations]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in destination.items()]
    path = workdir / f"config-{next(_names)}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _log(workdir: Path, name: str) -> Path:
    return workdir / f"{name}-{next(_names)}.log"


def start_receiver(workdir: Path, database: Database, synchronous: str = "FULL",
                   env: Mapping[str, str] | None = None, cpus: set[int] = SERVER_CPUS,
                   destinations: tuple[Mapping[str, Any], ...] = ()) -> tuple[Process, int]:
    """``trackrelay serve`` (one process) on a free port; returns it and its port."""
    port = free_port()
    config = write_config(workdir, database, port, synchronous, destinations)
    process = Process("trackrelay serve", [*TRACKRELAY, "serve", "--config", str(config)],
                      _log(workdir, "receiver"), cpus, env)
    try:
        process.wait_port(port)
    except BaseException:
        process.stop()
        raise
    return process, port


def start_worker(workdir: Path, database: Database, destinations: tuple[Mapping[str, Any], ...],
                 cpus: set[int] = SERVER_CPUS) -> tuple[Process, float]:
    """``trackrelay worker``; returns it and the time (epoch s) at which it logged its start."""
    config = write_config(workdir, database, destinations=destinations)
    process = Process("trackrelay worker", [*TRACKRELAY, "worker", "--config", str(config)],
                      _log(workdir, "worker"), cpus)
    try:
        started = log_time(process.wait_log(r"event=started role=worker"))
    except BaseException:
        process.stop()
        raise
    return process, started


def start_hello(workdir: Path, cpus: set[int] = SERVER_CPUS) -> tuple[Process, int]:
    port = free_port()
    process = Process("hello", [sys.executable, "-m", "bench.hello", "--port", str(port)],
                      _log(workdir, "hello"), cpus)
    process.wait_port(port)
    return process, port


class Sink:
    """``bench.sink`` on a free port (with ``options``: see bench/sinks.py), with its counters
    one request away."""

    def __init__(self, workdir: Path, record: bool = False, cpus: set[int] = SERVER_CPUS,
                 options: Sequence[str] = ()) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.sink", "--port", str(self.port),
                *(["--record"] if record else []), *options]
        self.process = Process("sink", argv, _log(workdir, "sink"), cpus)
        self.url = f"http://127.0.0.1:{self.port}/in"
        try:
            self.process.wait_port(self.port)
        except BaseException:
            self.process.stop()
            raise

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET ``path``, or POST ``body`` to it as JSON."""
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", data=data, timeout=30) as answer:
            return json.loads(answer.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/stats")

    def arrivals(self) -> dict[str, float]:
        return self._call("/arrivals")

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
