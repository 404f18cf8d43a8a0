"""Starting and stopping the receiver: migrations check, sockets, processes, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from socket import socket

from tornado import httputil
from tornado.netutil import bind_sockets

from pipeline import loop as event_loop
from pipeline.config import Config
from pipeline.heap import freeze_before_fork, settle_for_serving
from pipeline.migrate import current_revision, head_revision, upgrade
from pipeline.store import Store
from receiver.answers import retry_after
from receiver.admin.server import start_console
from receiver.app import make_router
from receiver.connections import ConnectionLimits, GuardedHTTPServer, descriptor_limit
from receiver.context import ReceiverContext
from pipeline.worker import run_worker
from receiver.processes import supervise

log = logging.getLogger("trackrelay.server")

SHUTDOWN_GRACE_SECONDS = 10.0


class DatabaseBehind(Exception):
    """The database schema is older than this code: `trackrelay migrate` fixes it."""


def prepare_database(config: Config, migrate: bool) -> None:
    """Migrate (single-box mode) or refuse a database that is behind (``serve``)."""
    if not migrate:
        return check_database(config)
    store = Store.open(config.database)
    try:
        upgrade(store.engine)
    finally:
        store.dispose()  # no connection may cross a fork


def check_database(config: Config) -> None:
    """Raise DatabaseBehind unless the schema is at this code's head revision."""
    store = Store.open(config.database)
    try:
        current, head = current_revision(store.engine), head_revision()
        if current != head:
            raise DatabaseBehind(f"the database is at revision {current or 'none'}, this trackrelay needs "
                                 f"{head}: run `trackrelay migrate` first")
    finally:
        store.dispose()  # no connection may cross a fork


def serve(config: Config, migrate: bool = False, with_worker: bool = False) -> int:
    """Run the receiver (and, in single-box mode, the worker in its own process, so delivery
    never stalls the receiver's event loop) in the foreground until SIGINT/SIGTERM."""
    prepare_database(config, migrate)
    receiver = config.receiver
    sockets = bind_sockets(receiver.port, receiver.host)
    admin = bind_sockets(config.admin.port, config.admin.host) if config.admin.serving else []
    log.info("event=listening host=%s port=%d processes=%d worker=%s database=%s", receiver.host,
             receiver.port, receiver.processes, with_worker, config.database.url.split("://")[0])
    if admin:
        url = console_url(config.admin.host, admin[0].getsockname()[1])
        log.info("event=console_listening url=%s token=%s", url, "set" if config.admin.token else "none")
        print(f"trackrelay: console and /metrics at {url}", flush=True)
    if receiver.processes == 1 and not with_worker:
        return run_receiver(config, sockets, admin)
    freeze_before_fork()
    # Exactly one process serves the console; the others close its socket.
    targets = [lambda: run_receiver(config, sockets, admin)]
    targets += [lambda: run_receiver(config, sockets, _closed(admin))] * (receiver.processes - 1)
    if with_worker:
        targets.append(lambda: _worker_process(config, sockets + admin))
    return supervise(targets)


def console_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _closed(sockets: list[socket]) -> list[socket]:
    for sock in sockets:
        sock.close()
    return []


def _worker_process(config: Config, sockets: list[socket]) -> int:
    _closed(sockets)  # the worker does not serve HTTP
    return run_worker(config)


def run_receiver(config: Config, sockets: list[socket], admin_sockets: list[socket] | None = None) -> int:
    async def until_signalled() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(config, sockets, stop, started=settle_for_serving, admin_sockets=admin_sockets)
        return 0

    return event_loop.run(until_signalled())


async def serve_until(config: Config, sockets: list[socket], stop: asyncio.Event,
                      started: Callable[[], None] | None = None, admin_sockets: list[socket] | None = None) -> None:
    """Serve on ``sockets`` (and the console on ``admin_sockets``) until ``stop`` is set, then
    finish in-flight commits and return. ``started`` is called once the server accepts
    connections (a process settles its heap then: pipeline/heap.py)."""
    receiver = config.receiver
    store = Store.open(config.database)
    ctx = ReceiverContext.create(config, store)
    ctx.start()
    allow_query_fields(receiver.max_url_bytes)
    limits = ConnectionLimits.of(receiver, descriptor_limit(), int(retry_after(receiver.retry_after_seconds)))
    log.info("event=connection_limits max_connections=%d header_timeout=%gs idle_timeout=%gs max_url_bytes=%d "
             "max_buffered_bytes=%d", limits.max_connections, limits.header_timeout, limits.idle_timeout,
             limits.max_url_bytes, receiver.max_buffered_bytes)
    server = GuardedHTTPServer(make_router(ctx), limits=limits,
                               count=lambda code: ctx.guard.count("", "connection", code),
                               xheaders=receiver.trust_forwarded_headers, decompress_request=False,
                               # Our handlers enforce the real limits; Tornado's only bounds what we
                               # read and throw away, so over-limit clients still get their 413.
                               max_body_size=receiver.discard_cap_bytes + 1,
                               max_header_size=receiver.max_header_bytes,
                               # Backstops: receiver/connections.py times out idle connections and
                               # slow heads, receiver/timeouts.py ingest bodies, both before these.
                               idle_connection_timeout=max(receiver.idle_timeout_seconds,
                                                           receiver.header_timeout_seconds) + 5,
                               body_timeout=receiver.body_timeout_seconds + 5)
    server.add_sockets(sockets)
    console = start_console(ctx, admin_sockets) if admin_sockets else None
    if started is not None:
        started()
    log.info("event=started role=receiver")
    await stop.wait()
    log.info("event=stopping role=receiver in_flight=%d", len(ctx.active))
    server.stop()
    if console is not None:
        await console.stop()
    await ctx.drain(SHUTDOWN_GRACE_SECONDS)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        pass
    store.dispose()
    log.info("event=stopped role=receiver")


def allow_query_fields(max_url_bytes: int) -> None:
    """Tornado refuses a query of more than 1,000 fields with a bare 400, before any handler
    (a pixel must answer its GIF). A query cannot hold more fields than its URL has bytes
    over two ("a&"), and max_url_bytes bounds the URL before Tornado parses it."""
    config = httputil.ParseBodyConfig()
    config.urlencoded.max_arguments = max(config.urlencoded.max_arguments, max_url_bytes // 2 + 1)
    httputil.set_parse_body_config(config)
