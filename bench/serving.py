"""Serving a benchmark's own Tornado app (hello-world, sink) until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from tornado.web import Application


async def serve_until_signalled(app: Application, port: int) -> None:
    server = app.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
