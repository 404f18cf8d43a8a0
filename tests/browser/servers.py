"""The servers a browser test talks to, all on loopback: the static server of the test pages
(one per origin), and ``trackrelay run`` as a real process with its config file and database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler, StaticFileHandler

from pipeline_harness import CONSOLE_OFF, Process, Processes, wait_for, write_config

START_SECONDS = 30.0
# The write keys of the relays' sources: one per test, so that no test sees another's events or
# SDK state; the locked source takes only the test site's origin, the limited one 2 requests/s.
WEB_KEYS = ["inline-key", "settings-key", "batching-key", "snippet-key", "rudder-key", "pixel-key", "example-key"]
LOCKED_KEY = "locked-key"
LIMITED_KEY = "limited-key"


class PageHandler(RequestHandler):
    def initialize(self, pages: dict[str, str]) -> None:
        self.pages = pages

    def get(self, name: str) -> None:
        if name not in self.pages:
            self.send_error(404)
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(self.pages[name])


class NoFavicon(RequestHandler):
    def get(self) -> None:
        self.set_status(204)


class SdkHandler(StaticFileHandler):
    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-store")


class StaticServer:
    """Serves the test pages (``/p/<name>``, registered with :meth:`page`) and the npm folder
    (``/sdk/<package path>``) on a loopback port of its own: one origin, ``origin``."""

    def __init__(self, node_modules: Path) -> None:
        self.pages: dict[str, str] = {}
        sockets = bind_sockets(0, "127.0.0.1")
        self.origin = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        app = Application([(r"/p/(.+)", PageHandler, {"pages": self.pages}),
                           (r"/sdk/(.+)", SdkHandler, {"path": str(node_modules)}),
                           (r"/favicon\.ico", NoFavicon)])
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ready = threading.Event()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            server = HTTPServer(app)
            server.add_sockets(sockets)
            ready.set()
            await self._stop.wait()
            server.stop()
            await server.close_all_connections()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "static server did not start"

    def page(self, name: str, html: str) -> str:
        """Serve ``html`` at ``/p/<name>``; its URL."""
        self.pages[name] = html
        return f"{self.origin}/p/{name}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Relay:
    """``trackrelay run --config <dir>/trackrelay.toml`` (receiver and worker) on a free loopback
    port with a SQLite file in ``directory``, started and stopped by the fixtures."""

    def __init__(self, directory: Path, destinations: Sequence[dict[str, Any]],
                 sources: Sequence[dict[str, Any]], receiver: dict[str, Any] | None = None,
                 public_url: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = directory / "trackrelay.db"
        receiver = {"host": "127.0.0.1", "port": self.port, **(receiver or {})}
        if public_url:
            receiver["public_url"] = self.url
        self.config_path = write_config(directory / "trackrelay.toml", f"sqlite:///{self.db_path}", destinations,
                                        sources, receiver=receiver)
        self._processes = Processes(directory)
        with pytest.MonkeyPatch.context() as env:  # the relay sees no TRACKRELAY_* of the shell
            for name in [n for n in os.environ if n.startswith("TRACKRELAY_")]:
                env.delenv(name)
            env.setenv(*CONSOLE_OFF)
            self.process: Process = self._processes.start("run", "--config", str(self.config_path))
        try:
            wait_for(self._healthy, f"trackrelay to answer {self.url}/health", START_SECONDS)
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        if self.process.popen.poll() is not None:
            raise AssertionError(f"trackrelay exited {self.process.popen.returncode} at start-up "
                                 f"(config {self.config_path}):\n{self.process.log}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def rejected(self) -> list[dict[str, Any]]:
        """Rows of the ``rejected`` table, read from the SQLite file."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute("SELECT * FROM rejected ORDER BY id")]

    def stop(self) -> None:
        if self.process.popen.poll() is None:
            self.process.signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except Exception:  # killed below
                pass
        self._processes.kill_leftovers()
