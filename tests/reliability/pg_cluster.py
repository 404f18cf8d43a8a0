"""A throwaway Postgres cluster for the outage tests: ``initdb`` in a temporary folder, its own
free port on 127.0.0.1 and its unix socket in that folder, so that a test can stop it
(``-m fast``, ``-m immediate``) or freeze it (SIGSTOP) without touching the shared server on
5432. As root, initdb, pg_ctl and the server run as the ``postgres`` OS user (Postgres refuses
to run as root). Torn down always: thawed, stopped, the folder removed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from pipeline_harness import free_port


def postgres_bin() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no initdb under /usr/lib/postgresql/*/bin: install the postgresql package")
    return Path(found[-1]).parent


class ThrowawayCluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._frozen: list[int] = []
        self.data = folder / "data"
        self.port = free_port()
        self.bin = postgres_bin()
        self.log = folder / "server.log"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(folder, user.pw_uid, user.pw_gid)
            self._as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run([*self._as_postgres, *args], cwd=self.folder, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} exited {done.returncode}: {done.stderr.decode()[-2000:]}"
                               f"\n{self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''}")

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions", "--no-sync")
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.folder}'\nmax_connections = 40\n"
                       "shared_buffers = 16MB\nfsync = on\nsynchronous_commit = on\n")

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, checkpointer, walwriter, ...)."""
        postmaster = self.postmaster()
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(entry))
        return [postmaster, *children]

    def freeze(self) -> list[int]:
        """SIGSTOP the whole server: connections stay open, nothing answers."""
        os.kill(self.postmaster(), signal.SIGSTOP)  # first: it forks no new backend meanwhile
        frozen = self.pids()
        for pid in frozen[1:]:
            os.kill(pid, signal.SIGSTOP)
        self._frozen = frozen
        return frozen

    def thaw(self) -> None:
        for pid in self._frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._frozen = []

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url + "/postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url + "/postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def teardown(self) -> None:
        self.thaw()
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                for pid in self.pids():
                    os.kill(pid, signal.SIGKILL)


@contextmanager
def throwaway_cluster() -> Iterator[ThrowawayCluster]:
    """A started cluster in a temporary folder (not under pytest's tmp_path: the postgres user
    must be able to reach it); stopped and removed however the test ends."""
    folder = Path(tempfile.mkdtemp(prefix="trackrelay-pg-"))
    try:
        cluster = ThrowawayCluster(folder)
        try:
            cluster.init()
            cluster.start()
            yield cluster
        finally:
            cluster.teardown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
