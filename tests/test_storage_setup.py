"""How pipeline.store sets up its connections (SQLite pragmas, the Postgres lock timeout), and
that the pipeline and its migrations never import the receiver."""

from __future__ import annotations

import ast
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import text

import pipeline.store
from pipeline.config import DatabaseConfig
from pipeline.store import Store, StoreUnavailable, create_store_engine
from pipeline_harness import errors_on_threads
from stored_rows import outbox_row, rows

ROOT = Path(__file__).resolve().parent.parent


def sqlite_pragmas(url: str, **settings: object) -> tuple[str, int, int]:
    engine = create_store_engine(DatabaseConfig(url=url, **settings))  # type: ignore[arg-type]
    try:
        with engine.connect() as conn:
            return (conn.exec_driver_sql("PRAGMA journal_mode").scalar_one(),
                    conn.exec_driver_sql("PRAGMA synchronous").scalar_one(),
                    conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())
    finally:
        engine.dispose()


def test_sqlite_connections_use_wal_and_fsync_every_commit_by_default(tmp_path: Path) -> None:
    assert sqlite_pragmas(f"sqlite:///{tmp_path / 'a.db'}") == ("wal", 2, 5000)


def test_sqlite_synchronous_normal_and_the_lock_timeout_are_applied(tmp_path: Path) -> None:
    assert sqlite_pragmas(f"sqlite:///{tmp_path / 'a.db'}", sqlite_synchronous="NORMAL",
                          lock_timeout_seconds=0.25) == ("wal", 1, 250)


@pytest.mark.postgres
def test_postgres_connections_fail_a_blocked_lock_after_the_lock_timeout(postgres_url: str) -> None:
    engine = create_store_engine(DatabaseConfig(url=postgres_url, lock_timeout_seconds=1.5))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_setting('lock_timeout')")).scalar_one() == "1500ms"
    finally:
        engine.dispose()


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_no_module_of_the_pipeline_or_the_migrations_imports_the_receiver() -> None:
    files = sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "migrations").rglob("*.py"))
    assert len(files) > 20  # the walk found the packages

    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path)
                                                     if m == "receiver" or m.startswith("receiver."))
                 for path in files}
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_workers_sqlite_connections_do_not_wait_for_the_disk(tmp_path: Path) -> None:
    engine = create_store_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'w.db'}"), at_least_once=True)
    with engine.connect().execution_options(readonly=True) as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


@pytest.mark.postgres
def test_the_workers_postgres_sessions_commit_without_waiting_for_the_wal(postgres_url: str) -> None:
    receiver = create_store_engine(DatabaseConfig(url=postgres_url))
    worker = create_store_engine(DatabaseConfig(url=postgres_url), at_least_once=True)
    with receiver.connect() as conn:
        assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    with worker.connect() as conn:
        assert conn.execute(text("SHOW synchronous_commit")).scalar() == "off"
    receiver.dispose()
    worker.dispose()


@contextmanager
def store_whose_pooled_connection_was_cut(url: str) -> Iterator[Store]:
    """A Store on the Postgres at ``url`` holding one outbox row and one pooled connection,
    whose session has then been ended, as a Postgres restart ends it."""
    store = Store.open(DatabaseConfig(url=url))
    try:
        store.append([outbox_row({"type": "track"}, "track")])  # the pool now holds a connection
        admin = sa.create_engine(sa.make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :name AND pid <> pg_backend_pid()"),
                             {"name": sa.make_url(url).database})
        finally:
            admin.dispose()
        yield store
    finally:
        store.dispose()


@pytest.mark.postgres
def test_a_pooled_postgres_connection_cut_while_idle_is_replaced_before_use(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with store_whose_pooled_connection_was_cut(postgres_url) as store:
        monkeypatch.setattr(pipeline.store, "PING_AFTER_IDLE_SECONDS", 0.0)  # it has been idle "long"
        store.append([outbox_row({"type": "track"}, "track")])  # tested, found dead, replaced
        assert len(rows(store, "outbox")) == 2


@pytest.mark.postgres
def test_a_postgres_connection_cut_between_busy_transactions_fails_one_write_then_recovers(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with store_whose_pooled_connection_was_cut(postgres_url) as store:
        monkeypatch.setattr(pipeline.store, "PING_AFTER_IDLE_SECONDS", 3600.0)  # never idle: no ping
        with pytest.raises(StoreUnavailable):
            store.append([outbox_row({"type": "track"}, "track")])  # the receiver answers this one 503
        store.append([outbox_row({"type": "track"}, "track")])
        assert len(rows(store, "outbox")) == 2


def _rollback_journal_file(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as plain:
        plain.execute("CREATE TABLE t (x)")  # a file in the default (rollback journal) mode
    return path


def test_connections_opening_a_new_sqlite_file_together_all_switch_it_to_wal(tmp_path: Path) -> None:
    """SQLite refuses the switch to WAL at once, without waiting out busy_timeout, when another
    connection is switching too (each holds a shared lock and wants the exclusive one): a
    receiver's first request and the test reading its outbox made one of them fail."""
    for round_ in range(30):
        path = _rollback_journal_file(tmp_path / f"new-{round_}.db")
        barrier = threading.Barrier(4)

        def open_together(_: int, path: Path = path, barrier: threading.Barrier = barrier) -> None:
            store = Store.open(DatabaseConfig(url=f"sqlite:///{path}", lock_timeout_seconds=5))
            try:
                barrier.wait(5)
                with store.engine.connect() as conn:
                    assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            finally:
                store.dispose()

        assert errors_on_threads(open_together, range(4)) == []


def test_the_switch_to_wal_gives_up_after_the_lock_timeout(tmp_path: Path) -> None:
    path = _rollback_journal_file(tmp_path / "held.db")
    with closing(sqlite3.connect(path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # holds the write lock for the whole test
        writer.execute("INSERT INTO t VALUES (1)")
        store = Store.open(DatabaseConfig(url=f"sqlite:///{path}", lock_timeout_seconds=0.3))
        started = time.monotonic()
        try:
            with pytest.raises(sa.exc.OperationalError, match="database is locked"), store.engine.connect():
                pass
        finally:
            store.dispose()
    assert time.monotonic() - started < 3  # the timeout, not a retry loop without end
