"""The receiver's commit signal reaches a listening worker, on each backend."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pipeline.config import DatabaseConfig
from pipeline.store import Store, now_ms
from pipeline.wakeup import CHANNEL, outbox_signal, sqlite_address, start_listener


def outbox_row() -> dict[str, object]:
    return {"received_at_ms": now_ms(), "route": "track", "source": "default", "body": b"{}"}


@pytest.mark.postgres
def test_an_outbox_insert_notifies_listeners_at_commit_on_postgres(postgres_url: str) -> None:
    store = Store.open(DatabaseConfig(url=postgres_url))
    dsn = sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        store.append([outbox_row(), outbox_row()])
        received = [n.channel for n in listener.notifies(timeout=5, stop_after=1)]
        store.append([], [])  # nothing inserted: nothing to signal
        quiet = list(listener.notifies(timeout=0.3, stop_after=1))
    store.dispose()
    assert received == [CHANNEL]
    assert quiet == []


def test_a_commit_signal_wakes_the_sqlite_listener(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'signal.db'}"
    assert sqlite_address(url) == sqlite_address(f"sqlite:///{tmp_path}/./signal.db")
    assert sqlite_address(f"sqlite:///{tmp_path / 'other.db'}") != sqlite_address(url)

    async def scenario() -> int:
        woken = asyncio.Event()
        calls = 0

        def on_signal() -> None:
            nonlocal calls
            calls += 1
            woken.set()

        listener = start_listener(url, on_signal)
        assert listener is not None
        signal = outbox_signal(url)
        assert signal is not None
        signal.send()
        await asyncio.wait_for(woken.wait(), 5)
        signal.close()
        listener.close()
        return calls

    assert asyncio.run(scenario()) >= 1


def test_a_signal_with_nobody_listening_is_harmless(tmp_path: Path) -> None:
    signal = outbox_signal(f"sqlite:///{tmp_path / 'alone.db'}")
    assert signal is not None
    signal.send()  # no worker: must neither raise nor block
    signal.close()


def test_a_receiver_closes_its_wakeup_socket_once_drained(tmp_path: Path) -> None:
    from conftest import make_config
    from receiver.context import ReceiverContext

    url = f"sqlite:///{tmp_path / 'closing.db'}"
    store = Store.open(DatabaseConfig(url=url))
    try:
        ctx = ReceiverContext.create(make_config(url), store)
        wakeup = ctx.wakeup
        assert wakeup is not None and wakeup._socket.fileno() >= 0

        asyncio.run(ctx.drain(0))

        assert ctx.wakeup is None
        assert wakeup._socket.fileno() == -1  # closed, not left for the garbage collector
    finally:
        store.dispose()
