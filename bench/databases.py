"""A fresh, migrated database for every run: a copy of a migrated SQLite file, or a Postgres
database created from a migrated template. ``trackrelay migrate`` runs once per backend."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench.processes import TRACKRELAY, BenchError, clean_env

DEFAULT_POSTGRES_URL = os.environ.get("TRACKRELAY_TEST_POSTGRES_URL",
                                      "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Database:
    backend: str  # "sqlite" or "postgres"
    url: str  # as trackrelay takes it
    name: str  # the file path (SQLite) or the database name (Postgres)

    @property
    def dsn(self) -> str:
        """For sqlite3.connect (a path) or psycopg.connect (a libpq URL)."""
        return self.name if self.backend == "sqlite" else self.url


def libpq_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


class Databases:
    def __init__(self, workdir: Path, postgres_url: str = DEFAULT_POSTGRES_URL) -> None:
        self.workdir = workdir
        self.postgres_url = libpq_url(postgres_url)
        self._count = itertools.count()
        self._prefix = f"trackrelay_bench_{os.getpid()}"
        self._templates: dict[str, Database] = {}

    def postgres_problem(self) -> str | None:
        """Why Postgres cannot be used (None when it answers)."""
        try:
            with psycopg.connect(self.postgres_url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"Postgres unreachable at {make_url(self.postgres_url).render_as_string()}: {exc}"
        return None

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.postgres_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def _template(self, backend: str) -> Database:
        if backend not in self._templates:
            if backend == "sqlite":
                path = self.workdir / "template.sqlite"
                template = Database("sqlite", f"sqlite:///{path}", str(path))
            else:
                name = f"{self._prefix}_template"
                self._admin(f'DROP DATABASE IF EXISTS "{name}"')
                self._admin(f'CREATE DATABASE "{name}"')
                template = Database("postgres", libpq_url(self.postgres_url, name), name)
            migrate(template.url)
            self._templates[backend] = template
        return self._templates[backend]

    def create(self, backend: str) -> Database:
        template = self._template(backend)
        number = next(self._count)
        if backend == "sqlite":
            path = self.workdir / f"run-{number}.sqlite"
            shutil.copyfile(template.name, path)
            return Database("sqlite", f"sqlite:///{path}", str(path))
        name = f"{self._prefix}_{number}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template.name}"')
        return Database("postgres", libpq_url(self.postgres_url, name), name)

    def drop(self, database: Database) -> None:
        if database.backend == "sqlite":
            for suffix in ("", "-wal", "-shm", ".worker-lock"):
                Path(database.name + suffix).unlink(missing_ok=True)
        else:
            self._admin(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')

    def close(self) -> None:
        for template in self._templates.values():
            self.drop(template)
        self._templates.clear()


def migrate(url: str) -> None:
    done = subprocess.run([*TRACKRELAY, "migrate", "--database-url", url, "--log-level", "WARNING"],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    if done.returncode != 0:
        raise BenchError(f"trackrelay migrate failed: {done.stderr.strip()}")
