"""Starting and stopping the console's listener inside a receiver process."""

from __future__ import annotations

import asyncio
from socket import socket

from tornado.httpserver import HTTPServer

from receiver.admin.app import make_admin_app
from receiver.admin.context import AdminContext
from receiver.admin.live import LiveFeed
from receiver.context import ReceiverContext


class Console:
    def __init__(self, ctx: AdminContext, server: HTTPServer) -> None:
        self.ctx, self.server = ctx, server

    async def stop(self) -> None:
        """Stop accepting, end open console connections (a live stream would hold one for
        ever), and give the pool back."""
        self.server.stop()
        await self.ctx.live.close()
        try:
            await asyncio.wait_for(self.server.close_all_connections(), 2)
        except asyncio.TimeoutError:
            pass
        self.ctx.close()


def start_console(receiver: ReceiverContext, sockets: list[socket]) -> Console:
    ctx = AdminContext.create(lambda: receiver.config)
    ctx.live = LiveFeed(ctx.store)
    server = HTTPServer(make_admin_app(ctx), xheaders=False, idle_connection_timeout=60, body_timeout=30,
                        max_body_size=1024 * 1024)
    server.add_sockets(sockets)
    return Console(ctx, server)
