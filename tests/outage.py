"""Taking a test's database away from the receiver, and giving it back, on either backend.

SQLite: another connection holds the write lock (``BEGIN EXCLUSIVE``), so writers time out.
Postgres: the database refuses new connections and its sessions are terminated.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa


@contextmanager
def store_down(database_url: str) -> Iterator[None]:
    """While inside, the database at ``database_url`` cannot take writes."""
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        with _sqlite_locked(str(url.database)):
            yield
    else:
        with _postgres_refusing(url):
            yield


@contextmanager
def _sqlite_locked(path: str) -> Iterator[None]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@contextmanager
def _postgres_refusing(url: sa.URL) -> Iterator[None]:
    name = url.database
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
        yield
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
