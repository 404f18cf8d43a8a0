"""Shared fixtures: one suite against SQLite files and the real Postgres, real servers on loopback.

Postgres: a template database is migrated once per session; each test gets
``CREATE DATABASE ... TEMPLATE`` of it. Without a reachable Postgres the Postgres half is
skipped, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from tornado.netutil import bind_sockets

from pipeline.config import Config, DatabaseConfig, ReceiverConfig, SourceConfig
from pipeline.migrate import upgrade
from pipeline.store import Store, create_store_engine
from receiver.server import serve_until

POSTGRES_ADMIN_URL = os.environ.get(
    "TRACKRELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_counter = itertools.count()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no TRACKRELAY_* or proxy settings from the shell that runs them."""
    for name in list(os.environ):
        if name.startswith("TRACKRELAY_") and name != "TRACKRELAY_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
        # The HTTP destinations honour the proxy variables: a shell's proxy must not carry the
        # tests' loopback requests (tests/test_proxy.py sets its own).
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    # The console's default port is fixed (8089): servers started by tests run without it, so
    # that two at once do not collide. The console's own tests set their port (CONSOLE_OFF).
    from pipeline_harness import CONSOLE_OFF  # (it imports this module)

    monkeypatch.setenv(*CONSOLE_OFF)



def _admin_engine() -> sa.Engine:
    return sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 3})


def _url_for(database: str) -> str:
    return sa.make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """Name of a migrated template database; skip (or fail under CI) without Postgres."""
    name = f"trackrelay_tpl_{os.getpid()}"
    try:
        admin = _admin_engine()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"Postgres is required under CI and unreachable: {exc}") from exc
        pytest.skip(f"Postgres unreachable at {POSTGRES_ADMIN_URL}: {exc}")
    engine = sa.create_engine(_url_for(name))
    upgrade(engine)
    engine.dispose()
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def postgres_url(postgres_template: str) -> Iterator[str]:
    name = f"trackrelay_t_{os.getpid()}_{next(_counter)}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield _url_for(name)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite file under tmp_path."""
    url = f"sqlite:///{tmp_path / 'trackrelay.db'}"
    engine = sa.create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated database of each backend: a SQLite file under tmp_path, or a fresh Postgres DB."""
    return request.getfixturevalue("postgres_url" if request.param == "postgres" else "sqlite_url")


def make_config(database_url: str, sources: dict[str, list[str]] | None = None,
                **receiver: Any) -> Config:
    """A Config for tests: ``sources`` maps names to write keys; ``receiver`` overrides settings."""
    return Config(
        database=DatabaseConfig(url=database_url, lock_timeout_seconds=receiver.pop("lock_timeout_seconds", 2.0)),
        receiver=replace(ReceiverConfig(port=0), **receiver),
        sources=tuple(SourceConfig(name=n, write_keys=tuple(k)) for n, k in (sources or {}).items()),
    )


class RunningReceiver:
    """A real receiver on a loopback port, served from a thread with its own event loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sockets = bind_sockets(0, "127.0.0.1")
        self.port = self.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = Store(create_store_engine(config.database))
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready.set()
            await serve_until(config, self.sockets, self._stop)

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "receiver did not start"

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        if body is not None and not isinstance(body, (bytes, str)):
            kwargs["json"] = body
        elif body is not None:
            kwargs["content"] = body
        return self.client.post(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def outbox(self) -> list[dict[str, Any]]:
        return self.store.rows("outbox")

    def rejected(self) -> list[dict[str, Any]]:
        return self.store.rows("rejected")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(20)
            assert not self._thread.is_alive(), "receiver did not stop"
        self.client.close()
        self.store.dispose()


@pytest.fixture
def start_receiver(database_url: str) -> Iterator[Callable[..., RunningReceiver]]:
    """Start a receiver on the test's database: ``start_receiver(sources=..., **receiver_settings)``."""
    started: list[RunningReceiver] = []

    def start(sources: dict[str, list[str]] | None = None, **receiver: Any) -> RunningReceiver:
        running = RunningReceiver(make_config(database_url, sources, **receiver))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def receiver(start_receiver: Callable[..., RunningReceiver]) -> RunningReceiver:
    """A receiver in open mode with the default settings."""
    return start_receiver()


def unique_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def sink() -> Iterator[Any]:
    """A recording HTTP sink on loopback whose answers a test can script (tests/pipeline_harness)."""
    from http_sink import HttpSink
    from pipeline_harness import ScriptedSink

    running = HttpSink()
    yield ScriptedSink(running)
    running.stop()


@pytest.fixture
def start_pipeline(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``start_pipeline(destinations, sources=())``: config file, receiver and worker (a thread)."""
    from pipeline_harness import Pipelines

    pipelines = Pipelines(database_url, tmp_path)
    yield pipelines.start
    pipelines.stop_all()
