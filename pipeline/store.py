"""The storage layer: one SQLAlchemy engine serving SQLite and Postgres, every query named here.

Contract:
- ``append`` writes a group of outbox and rejected rows in ONE transaction and returns only
  once it is committed (on SQLite, with ``synchronous=FULL``, once the WAL is fsynced). It is
  blocking: callers on an event loop run it on a thread.
- A failed ``append`` has written nothing; it raises :class:`StoreUnavailable` when the
  database could not be reached, was locked past the timeout or is full, so that the caller
  answers 503 and the client retries.
- Every call opens and returns its own pooled connection; none is safe to share across threads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, SQLAlchemyError

from pipeline.config import DatabaseConfig
from pipeline.schema import outbox, rejected

log = logging.getLogger("trackrelay.store")


class StoreUnavailable(Exception):
    """The database cannot take writes now; the request may be retried later."""


class RowRefused(Exception):
    """The database refused this row itself (a constraint, a value it cannot hold)."""


def normalise_url(url: str) -> str:
    """Accept the URLs people paste (``postgres://``, ``postgresql://``) and use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def create_store_engine(config: DatabaseConfig, at_least_once: bool = False) -> Engine:
    """The engine for ``config``.

    ``at_least_once`` is for the worker: its commits (claims, outcomes, decoded rows) do not
    wait for the disk (SQLite ``synchronous=NORMAL``, Postgres ``synchronous_commit=off``). A
    power cut may then forget its last transactions, which only makes an event be decoded or
    delivered again; the receiver's acknowledged rows are never at risk (they were fsynced by
    the receiver's own commits)."""
    url = make_url(normalise_url(config.url))
    if url.get_backend_name() == "sqlite":
        if at_least_once:
            config = dataclasses.replace(config, sqlite_synchronous="NORMAL")
        return _sqlite_engine(url, config)
    if url.get_backend_name() == "postgresql":
        timeout_ms = int(config.lock_timeout_seconds * 1000)
        options = f"-c lock_timeout={timeout_ms}" + (" -c synchronous_commit=off" if at_least_once else "")
        engine = create_engine(
            url,
            pool_size=4,
            max_overflow=4,
            pool_timeout=config.lock_timeout_seconds,
            # Errors carry no statement parameters: they hold event bodies and write keys.
            hide_parameters=True,
            connect_args={"connect_timeout": max(1, int(config.lock_timeout_seconds)),
                          # A write blocked on a lock fails (-> 503) instead of waiting forever.
                          "options": options},
        )
        _ping_when_idle(engine)
        return engine
    raise ValueError(f"unsupported database URL scheme {url.drivername!r}: use sqlite:/// or postgresql://")


# A connection that sat in the pool a while may have been cut (a database restart, a proxy's
# idle timeout): it is tested before use, as pool_pre_ping does. One back from use moments ago
# is not: pool_pre_ping's round trip on every checkout was a fifth of the receiver's samples
# under load (R1 on Postgres) and an extra round trip for every worker transaction. A
# connection that breaks between two busy transactions fails that one, which the callers
# already handle (503, or the job runs again); the pool then replaces it.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def remember_idle_since(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()  # end the transaction the ping opened
        except Exception as exc:  # the driver's error: this connection is gone
            raise DisconnectionError(f"connection failed its ping: {exc}") from exc


def _sqlite_engine(url: Any, config: DatabaseConfig) -> Engine:
    # isolation_level=None hands transaction control to us: pysqlite's own BEGIN is deferred, and
    # a deferred writer that must upgrade its lock fails at once with SQLITE_BUSY instead of
    # waiting out busy_timeout. Every transaction here begins IMMEDIATE (it takes the write lock
    # up front, waiting up to the timeout); read-only work passes execution_options(readonly=True).
    engine = create_engine(
        url,
        hide_parameters=True,
        connect_args={"timeout": config.lock_timeout_seconds, "check_same_thread": False},
    )
    synchronous = config.sqlite_synchronous
    timeout_ms = int(config.lock_timeout_seconds * 1000)

    @event.listens_for(engine, "do_connect")
    def _before_connect(*_: Any) -> None:
        _wal_files_follow_database(str(url.database or ""))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={timeout_ms}")
        # WAL is a property of the file, so only a connection that finds it off switches it.
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            _switch_to_wal(cur, config.lock_timeout_seconds)
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    @event.listens_for(engine, "handle_error")
    def _reopen_when_read_only(context: Any) -> None:
        # SQLite opens a file it may not write read-only, without an error, and the connection
        # stays read-only after the file is writable again; the connections of one process
        # also share one mapping of the -shm file, read-only while any of them opened it so.
        # As a disconnect, the failing connection is closed and every older one is replaced
        # at its next checkout: the next writes open the file anew.
        orig = context.original_exception
        if isinstance(orig, sqlite3.OperationalError) and orig.sqlite_errorcode & 0xFF == sqlite3.SQLITE_READONLY:
            # SQLAlchemy leaves a disconnected connection's cursor open, and a statement alive
            # defers sqlite3's close (files and mapping kept until the garbage collector, which
            # a serving process runs rarely: pipeline/heap.py).
            cursor = getattr(context.execution_context, "cursor", None)
            if cursor is not None:
                cursor.close()
            context.is_disconnect = True

    return engine


def _wal_files_follow_database(path: str) -> None:
    """SQLite creates a database's -wal and -shm files with the database file's permissions and
    never changes them: made while the file was read-only, they keep every new connection
    read-only once the file is writable again. Give them the file's mode back before opening."""
    try:
        if not os.access(path, os.W_OK):
            return
        mode = stat.S_IMODE(os.stat(path).st_mode)
        for sidecar in (path + "-wal", path + "-shm"):
            if os.path.exists(sidecar) and not os.access(sidecar, os.W_OK):
                os.chmod(sidecar, mode)
    except OSError:
        pass  # not ours to change (or no file yet): the write fails and is answered 503 as before


# Primary result codes (an extended code keeps its primary one in the low byte).
_SQLITE_LOCK_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _switch_to_wal(cur: Any, timeout: float) -> None:
    """Switching to WAL needs an exclusive lock, which SQLite refuses at once, without waiting
    out busy_timeout, while another connection holds a lock: two connections opening a new
    file together (a receiver's first request and a worker) would make one fail. Retry until
    the switch is done, by us or by the other connection, or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in _SQLITE_LOCK_CODES or time.monotonic() > deadline:
                raise
        time.sleep(0.01)
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return


def is_unavailable(exc: BaseException) -> bool:
    """True when an error says the database cannot take writes now, not that a row is bad."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    # Pool timeouts and the like: nothing about our rows.
    return isinstance(exc, SQLAlchemyError) and not isinstance(exc, DBAPIError)


def now_ms() -> int:
    return int(time.time() * 1000)


OUTBOX_COLUMNS = ("received_at_ms", "route", "source", "body", "remote_addr", "user_agent", "auth_key",
                  "override_key", "state")


class Store:
    """The outbox and the rejected table, on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = engine.dialect.name
        # The receiver's hot statement, written once in the driver's own placeholders and run
        # with the driver's executemany: no per-commit statement compilation or rendering.
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._outbox_insert = (f"INSERT INTO outbox ({', '.join(OUTBOX_COLUMNS)}) "
                               f"VALUES ({', '.join([mark] * len(OUTBOX_COLUMNS))})")

    @classmethod
    def open(cls, config: DatabaseConfig, at_least_once: bool = False) -> Store:
        return cls(create_store_engine(config, at_least_once))

    def append(self, outbox_rows: Sequence[Mapping[str, Any]],
               rejected_rows: Sequence[Mapping[str, Any]] = ()) -> None:
        """Commit these rows together (see the module contract)."""
        try:
            with self.engine.begin() as conn:
                if outbox_rows:
                    # On Postgres a statement trigger (migration 0003) NOTIFYs the worker at
                    # commit: no extra round trip here (pipeline.wakeup).
                    conn.exec_driver_sql(self._outbox_insert, [
                        tuple(row.get(c, "pending" if c == "state" else None) for c in OUTBOX_COLUMNS)
                        for row in outbox_rows])
                if rejected_rows:
                    conn.execute(insert(rejected), list(rejected_rows))
        except SQLAlchemyError as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(short_error(exc)) from exc
            raise RowRefused(short_error(exc)) from exc

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a query now."""
        try:
            with self.engine.connect().execution_options(readonly=True) as conn:
                conn.execute(text("SELECT 1")).scalar_one()
        except SQLAlchemyError as exc:
            raise StoreUnavailable(short_error(exc)) from exc

    def count(self, table: str, **where: Any) -> int:
        tbl = {"outbox": outbox, "rejected": rejected}[table]
        query = select(func.count()).select_from(tbl)
        for column, value in where.items():
            query = query.where(tbl.c[column] == value)
        with self.engine.connect().execution_options(readonly=True) as conn:
            return conn.execute(query).scalar_one()

    def rows(self, table: str, columns: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every row of a table in id order: for tests and the operator CLI, not hot paths."""
        tbl = {"outbox": outbox, "rejected": rejected}[table]
        cols = [tbl.c[c] for c in columns] if columns else [tbl]
        with self.engine.connect().execution_options(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(select(*cols).order_by(tbl.c.id))]

    def probe_write(self) -> None:
        """Raise StoreUnavailable unless a write commits now: one row rewritten with its own
        value (the schema revision's), for /health when the last commit failed."""
        try:
            with self.engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(short_error(exc)) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def short_error(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's SQL and parameters (they may hold bodies)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:300]
