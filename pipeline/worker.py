"""The pipeline worker: APScheduler jobs that decode the outbox and deliver to destinations.

Jobs: ``decode``, one ``deliver:<name>`` per destination, ``reaper`` (expired leases),
``retention`` and, on SQLite, ``checkpoint``. Each runs on an interval (0.1 s by default for
decode and deliver), never overlaps itself, and drains its backlog before it returns, so a
backlog is worked through at full speed while idle ticks cost one cheap query. The database
work runs on threads; the adapters' I/O on the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import fcntl
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pipeline import loop as event_loop
from pipeline.config import Config, DestinationConfig, SourceConfig
from pipeline.controllers import PUBLISH_SECONDS, publish, withdraw
from pipeline.decoder import Decoder
from pipeline.delivery import DestinationRunner
from pipeline.destinations.base import Destination
from pipeline.destinations.registry import destination_type
from pipeline.heap import settle_for_serving
from pipeline.maintenance import apply_retention, checkpoint_wal
from pipeline.migrate import current_revision, head_revision
from pipeline.operations import orphaned_destinations
from pipeline.queue import DeliveryQueue
from pipeline.reload import ConfigSource, reloaded
from pipeline.store import Store, is_unavailable, now_ms, normalise_url, short_error
from pipeline.wakeup import start_listener

log = logging.getLogger("trackrelay.worker")

# APScheduler logs every run at INFO and a skipped overlapping run at WARNING; with 0.1 s
# ticks both would drown the log. Job exceptions are still logged (ERROR).
for _name in ("apscheduler.executors.default", "apscheduler.scheduler"):
    logging.getLogger(_name).setLevel(logging.ERROR)


M_ARENA_MAX = -8  # glibc's mallopt parameter


class WorkerLocked(Exception):
    """Another worker already runs on this SQLite database."""


class SchemaChanged(Exception):
    """The database was migrated to another schema while this worker ran."""


# How often a running worker checks that the database is still at its schema revision.
SCHEMA_CHECK_SECONDS = 1.0


def sqlite_lock_path(url: str) -> str | None:
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return os.path.abspath(parsed.database) + ".worker-lock"


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: Store | None = None
        self.adapters: dict[str, Destination] = {}
        self.runners: dict[str, DestinationRunner] = {}
        self.scheduler: AsyncIOScheduler | None = None
        self._stopping = False
        self._running: set[asyncio.Task[Any]] = set()
        self._lock_file: Any = None
        self._listener: Any = None
        self._active_jobs: set[str] = set()
        self._wanted_again: set[str] = set()
        self._failing: dict[str, tuple[str, float]] = {}
        # The task running each job now: a reload waits for a removed destination's to end.
        self._job_tasks: dict[str, asyncio.Task[Any]] = {}
        # Runners of destinations removed or changed by a reload: they claim no more.
        self._retiring: set[DestinationRunner] = set()
        # Write keys of sources a reload removed (see retired_sources).
        self._retired: list[SourceConfig] = []
        self._reloading = asyncio.Lock()
        # Set when the database's schema is no longer this code's (a newer version migrated
        # it): the worker stops claiming at once and run_worker_until returns.
        self.outdated = asyncio.Event()

    def stopping(self) -> bool:
        return self._stopping

    async def start(self) -> None:
        self._take_sqlite_lock()
        # The worker's own commits need not wait for the disk: losing one after a power cut
        # only means an event goes out again (see create_store_engine).
        self.store = Store.open(self.config.database, at_least_once=True)
        self.revision = head_revision()
        self.decoder = Decoder(self.store, self.config)
        self.queue = DeliveryQueue(self.store)
        if self.store.backend == "sqlite":
            # Only one worker runs on SQLite, so every lease is a dead worker's: take them back.
            taken = await asyncio.to_thread(self.queue.take_back_leases)
            if taken:
                log.info("event=leases_taken_back count=%d", taken)
        for dest in self.config.destinations:
            await self._add_destination(dest)
        self._schedule()
        # The receiver signals each commit, so new events do not wait for the next poll.
        self._listener = start_listener(self.config.database.url, lambda: self.wake("decode"))
        log.info("event=started role=worker destinations=%s", ",".join(self.adapters) or "none")
        if not self.adapters:
            log.warning("event=no_destinations detail='events are stored and decoded but go nowhere: "
                        "add [[destinations]] to the config'")
        await self._log_orphans()

    async def _add_destination(self, dest: DestinationConfig) -> DestinationRunner:
        """Build and start ``dest``'s adapter and runner (not its job)."""
        adapter = destination_type(dest.type)(dest.name, dest.options, dest.batch_size)
        await adapter.start()
        self.adapters[dest.name] = adapter
        problem = await adapter.check()
        if problem:
            log.warning("event=destination_unhealthy destination=%s problem=%r", dest.name, problem[:300])
        runner = self.runners[dest.name] = DestinationRunner(dest, adapter, self.queue,
                                                             self.config.worker.lease_seconds)
        return runner

    async def _log_orphans(self) -> None:
        """Say once (at start and after each reload) which unconfigured destinations still hold
        deliveries: nothing sends them until the destination is configured again or they are
        discarded (``trackrelay discard``)."""
        assert self.store is not None
        try:
            orphans = await asyncio.to_thread(orphaned_destinations, self.store, self.config)
        except SQLAlchemyError as exc:
            log.warning("event=orphans_not_checked error=%r", short_error(exc))
            return
        for orphan in orphans:
            log.warning("event=orphaned_destination destination=%s pending=%d dead=%d detail='not configured: its "
                        "deliveries wait until it is configured again or discarded (trackrelay discard "
                        "--destination NAME)'", orphan.name, orphan.pending, orphan.dead)

    def reload_sources(self, config: Config) -> None:
        """Decode with ``config``'s sources and routing from now on (no await: the decode job
        running on its thread finishes with the decoder it holds, the next takes the new one).
        Called first on SIGHUP, before the receivers take the new write keys where possible."""
        assert self.store is not None
        kept = {key for source in config.sources for key in source.write_keys}
        known = {d.name for d in config.destinations}
        for source in self.config.sources:
            gone = tuple(key for key in source.write_keys if key not in kept)
            if gone and config.sources:
                dests = None if source.destinations is None else tuple(d for d in source.destinations if d in known)
                self._retired.append(SourceConfig(name=source.name, write_keys=gone, destinations=dests))
        # Requests a receiver accepted before it dropped a key are still in the outbox: their
        # keys stay known to the decoder (the receivers refuse them from their own reload on).
        # The configured sources come last so that their routing wins for a name in both.
        decoding = dataclasses.replace(config, sources=(*self._retired, *config.sources) if config.sources else ())
        self.decoder = Decoder(self.store, decoding)

    async def reload(self, config: Config) -> None:
        """Apply a reloaded config's destinations: added ones get an adapter and a job, removed
        ones stop claiming, finish the batches they hold, and have their adapter closed; a
        changed one is both. Their pending deliveries stay, as orphans, for an operator."""
        async with self._reloading:
            before = {d.name: d for d in self.config.destinations}
            after = {d.name: d for d in config.destinations}
            self.config = config
            gone = [name for name, dest in before.items() if after.get(name) != dest]
            for name in gone:
                await self._retire(name)
            for name, dest in after.items():
                if before.get(name) != dest and not self._stopping:
                    try:
                        runner = await self._add_destination(dest)
                    except Exception as exc:
                        log.error("event=destination_not_started destination=%s error=%r", name, short_error(exc))
                        continue
                    self._add(f"deliver:{name}", self._deliverer(runner), config.worker.poll_interval_seconds)
            await self._log_orphans()

    async def _retire(self, name: str) -> None:
        runner = self.runners.pop(name, None)
        adapter = self.adapters.pop(name, None)
        if runner is None or adapter is None:
            return
        self._retiring.add(runner)
        job_id = f"deliver:{name}"
        if self.scheduler is not None and self.scheduler.get_job(job_id) is not None:
            self.scheduler.remove_job(job_id)
        task = self._job_tasks.get(job_id)
        if task is not None and not task.done():
            # Its lanes end after the batch each holds, recorded; the lease bounds how long.
            await asyncio.wait([task], timeout=self.config.worker.lease_seconds * 2)
        self._retiring.discard(runner)
        try:
            await adapter.close()
        except Exception:
            log.exception("event=adapter_close_failed destination=%s", name)
        log.info("event=destination_retired destination=%s", name)

    def _take_sqlite_lock(self) -> None:
        path = sqlite_lock_path(self.config.database.url)
        if path is None:
            return
        self._lock_file = open(path, "a+")  # noqa: SIM115 (held for the worker's lifetime)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise WorkerLocked(f"another trackrelay worker is already running on this SQLite database "
                               f"(lock {path}); SQLite takes one worker, use Postgres to run several") from None

    def _schedule(self) -> None:
        worker = self.config.worker
        self.scheduler = AsyncIOScheduler(timezone=timezone.utc)
        self._add("decode", self._decode, worker.poll_interval_seconds)
        for name, runner in self.runners.items():
            self._add(f"deliver:{name}", self._deliverer(runner), worker.poll_interval_seconds)
        self._add("reaper", self._reap, worker.reaper_interval_seconds)
        self._add("retention", self._retention, worker.retention_interval_seconds, first_run_now=True)
        if self.store is not None and self.store.backend == "sqlite":
            self._add("checkpoint", self._checkpoint, worker.checkpoint_interval_seconds)
        self._add("schema", self._check_schema, SCHEMA_CHECK_SECONDS)
        self._add("controllers", self._publish_controllers, PUBLISH_SECONDS)
        self.scheduler.start()

    def _add(self, job_id: str, job: Callable[[], Awaitable[Any]], seconds: float, first_run_now: bool = True) -> None:
        assert self.scheduler is not None

        async def tracked() -> None:
            if self._stopping:
                return
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            self._active_jobs.add(job_id)
            self._job_tasks[job_id] = task
            try:
                while True:
                    self._wanted_again.discard(job_id)
                    await job()
                    # A wake-up that came while we ran may be for work we did not see.
                    if job_id not in self._wanted_again or self._stopping:
                        break
                self._failing.pop(job_id, None)
            except Exception as exc:
                self._job_failed(job_id, exc)
            finally:
                self._active_jobs.discard(job_id)
                self._running.discard(task)
                if self._job_tasks.get(job_id) is task:
                    del self._job_tasks[job_id]

        self.scheduler.add_job(tracked, "interval", seconds=seconds, id=job_id, max_instances=1, coalesce=True,
                               misfire_grace_time=None,
                               next_run_time=datetime.now(timezone.utc) if first_run_now else None)

    def _job_failed(self, job_id: str, exc: Exception) -> None:
        """One structured line per job and problem, repeated at most every 30 s, instead of a
        traceback on every 0.1 s tick while a database is away."""
        error = short_error(exc)
        now = time.monotonic()
        last = self._failing.get(job_id)
        if last is not None and last[0] == error and now - last[1] < 30:
            return
        self._failing[job_id] = (error, now)
        if isinstance(exc, SQLAlchemyError) and is_unavailable(exc):
            log.warning("event=job_failed job=%s cause=database_unavailable error=%r", job_id, error)
        else:
            log.error("event=job_failed job=%s error=%r", job_id, error, exc_info=exc)

    def wake(self, job_id: str) -> None:
        """Run a job now instead of at its next tick; if it is running, once more when it ends."""
        if job_id in self._active_jobs:
            self._wanted_again.add(job_id)
            runner = self.runners.get(job_id.removeprefix("deliver:")) if job_id.startswith("deliver:") else None
            if runner is not None:
                runner.wake()  # its drain starts lanes for the new events at once
            return
        if self.scheduler is not None and not self._stopping:
            job = self.scheduler.get_job(job_id)
            if job is not None:
                job.modify(next_run_time=datetime.now(timezone.utc))

    async def _decode(self) -> None:
        while not self._stopping:
            result = await asyncio.to_thread(self.decoder.decode_pending)
            if result.deliveries:
                for name in self.runners:
                    self.wake(f"deliver:{name}")
            if not result.more:
                return

    def _deliverer(self, runner: DestinationRunner) -> Callable[[], Awaitable[Any]]:
        async def deliver() -> None:
            await runner.drain(lambda: self._stopping or runner in self._retiring)
        return deliver

    async def _reap(self) -> None:
        released = await asyncio.to_thread(self.queue.release_expired)
        if released:
            log.info("event=leases_expired count=%d", released)

    async def _check_schema(self) -> None:
        """Stop claiming the moment the database is migrated past this code: a claim of this
        version and one of a newer version could each lease the other's deliveries in flight
        (from migration 0004 on, Postgres claims no longer move next_attempt_at_ms)."""
        assert self.store is not None
        found = await asyncio.to_thread(current_revision, self.store.engine)
        if found != self.revision:
            self._stopping = True  # the lanes check it before every claim
            log.error("event=schema_changed found=%s expected=%s action=stopping detail='the database was "
                      "migrated by another trackrelay version: run that version's worker'", found, self.revision)
            self.outdated.set()

    async def _publish_controllers(self) -> None:
        """Write each HTTP destination's concurrency limit and round trip for status, the
        console and /metrics (pipeline/controllers.py)."""
        assert self.store is not None
        snapshots = {name: snapshot for name, adapter in self.adapters.items()
                     if (snapshot := adapter.concurrency_snapshot()) is not None}
        await asyncio.to_thread(publish, self.store, self.queue.owner, snapshots, now_ms())

    async def _retention(self) -> None:
        assert self.store is not None
        await asyncio.to_thread(apply_retention, self.store, self.config.worker)

    async def _checkpoint(self) -> None:
        assert self.store is not None
        await asyncio.to_thread(checkpoint_wal, self.store)

    async def stop(self, timeout: float = 30.0) -> None:
        """Let running jobs finish their current batch, then close adapters and the store."""
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.pause()
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout)
        if self.scheduler is not None and self.scheduler.running:
            # APScheduler's asyncio executor cancels the jobs still running when it shuts
            # down: only once they finished their batch (or the timeout passed).
            self.scheduler.shutdown(wait=False)
        for adapter in self.adapters.values():
            try:
                await adapter.close()
            except Exception:
                log.exception("event=adapter_close_failed destination=%s", adapter.name)
        if self.store is not None:
            try:
                if hasattr(self, "queue"):
                    await asyncio.to_thread(withdraw, self.store, self.queue.owner)
            except SQLAlchemyError as exc:  # a database that is away: the rows go stale instead
                log.warning("event=controllers_not_withdrawn error=%r", short_error(exc))
            self.store.dispose()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("event=stopped role=worker")


def reload_on_hangup(worker: Worker, source: ConfigSource) -> None:
    """SIGHUP: read the config file again; if it is valid, decode with its sources at once and
    apply its destinations in a task."""
    config = reloaded(source, worker.config, "worker")
    if config is None or worker.stopping():
        return
    worker.reload_sources(config)
    task = asyncio.ensure_future(worker.reload(config))
    worker._running.add(task)  # stop() waits for a reload under way
    task.add_done_callback(worker._running.discard)


async def run_worker_until(config: Config, stop: asyncio.Event, started: Callable[[], None] | None = None,
                           source: ConfigSource | None = None) -> None:
    """Run a worker until ``stop`` is set; ``started`` is called once it works (a process
    settles its heap then: pipeline/heap.py). With ``source``, SIGHUP reloads sources and
    destinations from it (main thread only)."""
    worker = Worker(config)
    try:
        await worker.start()
        if source is not None:
            import signal

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_on_hangup, worker, source)
        if started is not None:
            started()
        stopped = asyncio.ensure_future(stop.wait())
        outdated = asyncio.ensure_future(worker.outdated.wait())
        await asyncio.wait([stopped, outdated], return_when=asyncio.FIRST_COMPLETED)
        for waiting in (stopped, outdated):
            waiting.cancel()
    finally:
        await worker.stop()
    if worker.outdated.is_set():
        raise SchemaChanged("the database schema changed under this worker")


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core), and a
    big decode group on a database thread leaves its arena's pages resident: two arenas keep
    the worker's RSS near its live memory. Linux glibc only; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def run_worker(config: Config, source: ConfigSource | None = None) -> int:
    """The worker process: run until SIGINT/SIGTERM (SIGHUP reloads from ``source``); return
    the exit status."""
    import signal

    limit_malloc_arenas()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker_until(config, stop, started=settle_for_serving, source=source)

    try:
        event_loop.run(main())
    except WorkerLocked as exc:
        log.error("event=worker_refused error=%r", str(exc))
        return 1
    except SchemaChanged:
        return 1  # logged as event=schema_changed when it was found
    return 0
