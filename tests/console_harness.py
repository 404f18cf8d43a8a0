"""The console (receiver/admin/) served from a thread on a loopback port, for the API tests:
the real Tornado application, the real store, real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import httpx
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from pipeline.config import AdminConfig, Config
from receiver.admin.app import make_admin_app
from receiver.admin.context import AdminContext
from receiver.admin.live import LiveFeed


def with_console(config: Config, token: str = "", **admin: Any) -> Config:
    return dataclasses.replace(config, admin=AdminConfig(port=1, token=token, **admin))


class RunningConsole:
    def __init__(self, config: Config, poll_seconds: float = 0.1) -> None:
        self.config = config
        self.sockets = bind_sockets(0, "127.0.0.1")
        self.port = self.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ctx = AdminContext.create(lambda: self.config)
        self.ctx.live = LiveFeed(self.ctx.store, poll_seconds=poll_seconds)
        token = config.admin.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=30, headers=headers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: HTTPServer | None = None
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._server = HTTPServer(make_admin_app(self.ctx))
            self._server.add_sockets(self.sockets)
            self._stopped = asyncio.Event()
            ready.set()
            await self._stopped.wait()
            self._server.stop()
            await self.ctx.live.close()
            await self._server.close_all_connections()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "console did not start"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(20)
        self.client.close()
        self.ctx.close()
