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
from pipeline.reload import ConfigSource, reloaded
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


def serve(config: Config, migrate: bool = False, with_worker: bool = False, source: ConfigSource | None = None) -> int:
    """Run the receiver (and, in single-box mode, the worker in its own process, so delivery
    never stalls the receiver's event loop) in the foreground until SIGINT/SIGTERM. With
    ``source``, SIGHUP reloads sources and destinations from it in every process."""
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
        return run_receiver(config, sockets, admin, source)
    freeze_before_fork()
    # Exactly one process serves the console; the others close its socket. The worker comes
    # first: on SIGHUP it takes the new write keys before the receivers accept them.
    targets = [lambda: _worker_process(config, sockets + admin, source)] if with_worker else []
    targets += [lambda: run_receiver(config, sockets, admin, source)]
    targets += [lambda: run_receiver(config, sockets, _closed(admin), source)] * (receiver.processes - 1)
    return supervise(targets)


def console_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _closed(sockets: list[socket]) -> list[socket]:
    for sock in sockets:
        sock.close()
    return []


def _worker_process(config: Config, sockets: list[socket], source: ConfigSource | None = None) -> int:
    _closed(sockets)  # the worker does not serve HTTP
    return run_worker(config, source)


def run_receiver(config: Config, sockets: list[socket], admin_sockets: list[socket] | None = None,
                 source: ConfigSource | None = None) -> int:
    async def until_signalled() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(config, sockets, stop, started=settle_for_serving, admin_sockets=admin_sockets,
                          source=source)
        return 0

    return event_loop.run(until_signalled())


async def serve_until(config: Config, sockets: list[socket], stop: asyncio.Event,
                      started: Callable[[], None] | None = None, admin_sockets: list[socket] | None = None,
                      source: ConfigSource | None = None) -> None:
    """Serve on ``sockets`` (and the console on ``admin_sockets``) until ``stop`` is set, then
    finish in-flight commits and return. ``started`` is called once the server accepts
    connections (a process settles its heap then: pipeline/heap.py). With ``source``, SIGHUP
    reloads sources from it (main thread only)."""
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
    if source is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_receiver, ctx, source)
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


def reload_receiver(ctx: ReceiverContext, source: ConfigSource) -> None:
    """SIGHUP: read the config file again and, if it is valid, swap the sources, CORS policy and
    guard (on the loop, between two requests' steps). Requests already answered or being
    committed are not touched: none is dropped."""
    config = reloaded(source, ctx.config, "receiver")
    if config is not None:
        ctx.reload(config)


def allow_query_fields(max_url_bytes: int) -> None:
    """Tornado refuses a query of more than 1,000 fields with a bare 400, before any handler
    (a pixel must answer its GIF). A query cannot hold more fields than its URL has bytes
    over two ("a&"), and max_url_bytes bounds the URL before Tornado parses it."""
    config = httputil.ParseBodyConfig()
    config.urlencoded.max_arguments = max(config.urlencoded.max_arguments, max_url_bytes // 2 + 1)
    httputil.set_parse_body_config(config)
