"""Group commit: the requests that arrive while one commit is running share the next one.

A commit with fsync costs the same for one row as for hundreds, so the writer thread takes
every row that queued up during the previous commit (up to ``max_rows``) into one transaction,
then wakes each waiting request. Under light load that is one row per commit and no added
wait; under heavy load the batches grow by themselves. The database work never runs on the
event loop, and each request's answer still waits for its own row to be committed.

Under load a commit also waits, up to ``gather_seconds``, for the requests the receiver has
read and is judging to join it: a commit (and its fsync) costs the receiver's one core as
much CPU as several requests, so fewer, bigger groups answer more requests a second. A
request alone never waits: its commit starts as soon as no other request is being judged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.store import RowRefused, Store, StoreUnavailable

log = logging.getLogger("trackrelay.commit")

Row = Mapping[str, Any]


class _Pending:
    __slots__ = ("table", "row", "future")

    def __init__(self, table: str, row: Row, future: asyncio.Future[None]) -> None:
        self.table, self.row, self.future = table, row, future


class GroupCommitter:
    """Queue rows from the event loop; one writer thread commits them in groups."""

    def __init__(self, store: Store, max_rows: int = 500, timeout: float = 10.0,
                 on_commit: Callable[[], None] | None = None, gather_seconds: float = 0.0,
                 in_progress: Callable[[], int] | None = None,
                 observe: Callable[[float, int], None] | None = None) -> None:
        """``in_progress`` counts the requests read and not yet answered (being judged, or
        waiting here); with ``gather_seconds`` > 0 a commit waits for the others to queue."""
        if gather_seconds and in_progress is None:
            raise ValueError("gathering needs in_progress, the count of requests it waits for")
        self._store = store
        # Called on the writer thread after a commit that wrote outbox rows (wakes the worker).
        self._on_commit = on_commit
        self._max_rows = max_rows
        self._timeout = timeout
        self._gather = gather_seconds
        self._in_progress = in_progress
        self._gather_timer: asyncio.TimerHandle | None = None
        self._queue: list[_Pending] = []
        self._writing: asyncio.Future[None] | None = None
        self._group: list[_Pending] = []
        self._watchdog: asyncio.TimerHandle | None = None
        # Told each group commit's duration and rows, on the event loop (for /metrics).
        self._observe = observe
        self._write_started = 0.0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trackrelay-commit")
        self._closed = False
        # Why the last commit failed, while no commit has succeeded since (what /health says
        # when reads still work but writes do not: a held lock, a full disk, a read-only file).
        self.failing: str | None = None

    async def commit(self, table: str, row: Row) -> None:
        """Return once ``row`` is committed; raise StoreUnavailable if it could not be now,
        RowRefused if the database refuses this row itself (even alone in its transaction).

        Waiting is bounded: a commit that hangs becomes a 503 for everyone waiting on it after
        ``timeout`` seconds (see :meth:`_stalled`).
        """
        if self._closed:
            # A request read on a kept-alive connection after shutdown closed the writer: a 503
            # its client retries elsewhere, not a 500 from the thread pool that is gone.
            raise StoreUnavailable("the receiver is stopping")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append(_Pending(table, row, future))
        if self._writing is None:
            self._write_when_gathered(loop)
        await future

    def _write_when_gathered(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the next commit, unless requests still being read or judged will queue a row
        soon: then wait for the last of them, or for ``gather_seconds``, whichever comes first."""
        if self._gather and len(self._queue) < self._max_rows:
            assert self._in_progress is not None
            if self._in_progress() > len(self._queue):
                if self._gather_timer is None:
                    self._gather_timer = loop.call_later(self._gather, self._gathered, loop)
                return
        self._write_next(loop)

    def _gathered(self, loop: asyncio.AbstractEventLoop) -> None:
        self._gather_timer = None
        if self._writing is None and self._queue:
            self._write_next(loop)

    def _write_next(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._gather_timer is not None:
            self._gather_timer.cancel()
            self._gather_timer = None
        group, self._queue = self._queue[: self._max_rows], self._queue[self._max_rows:]
        self._group = group
        self._write_started = loop.time()
        self._writing = loop.run_in_executor(self._executor, self._write, group)
        self._writing.add_done_callback(lambda done: self._settle(loop, group, done))
        # One watchdog per commit, not a timer per request: the hot path stays lean.
        self._watchdog = loop.call_later(self._timeout, self._stalled, loop)

    def _stalled(self, loop: asyncio.AbstractEventLoop) -> None:
        """The commit in flight has not returned within the timeout: answer everyone waiting
        503 (the rows in flight may still land; a client's resend is deduplicated by messageId)
        and drop the queue, which would only wait behind it."""
        error = StoreUnavailable(f"no commit within {self._timeout:g} s")
        self.failing = str(error)
        waiting, self._queue = self._group + self._queue, []
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(error)
        log.warning("event=commit_stalled timeout=%g waiting=%d", self._timeout, len(waiting))
        self._watchdog = loop.call_later(self._timeout, self._stalled, loop)

    def _write(self, group: list[_Pending]) -> list[BaseException | None]:
        """On the writer thread: one transaction for the group, or row by row if one is bad."""
        try:
            self._append(group)
            if self._on_commit is not None and any(p.table == "outbox" for p in group):
                self._on_commit()
            return [None] * len(group)
        except StoreUnavailable as exc:
            return [exc] * len(group)
        except RowRefused as exc:
            if len(group) == 1:
                # Its own fault, not an outage: the request is answered with a final error (a
                # 503 would have its client resend it forever).
                log.error("event=row_refused table=%s error=%r", group[0].table, str(exc))
                return [exc]
        # One poison row must not fail the requests it happened to share a commit with.
        return [outcome for pending in group for outcome in self._write([pending])]

    def _append(self, group: list[_Pending]) -> None:
        self._store.append([p.row for p in group if p.table == "outbox"],
                           [p.row for p in group if p.table == "rejected"])

    def _settle(self, loop: asyncio.AbstractEventLoop, group: list[_Pending],
                done: asyncio.Future[list[BaseException | None]]) -> None:
        try:
            outcomes: list[BaseException | None] = done.result()
        except BaseException as exc:  # the executor itself failed: nothing was written
            outcomes = [StoreUnavailable(str(exc))] * len(group)
        unavailable = next((o for o in outcomes if isinstance(o, StoreUnavailable)), None)
        if unavailable is not None:
            self.failing = str(unavailable) or "the store refused writes"
        elif any(o is None for o in outcomes):
            self.failing = None
        for pending, outcome in zip(group, outcomes):
            if pending.future.done():
                continue
            if outcome is None:
                pending.future.set_result(None)
            else:
                pending.future.set_exception(outcome)
        self._writing = None
        self._group = []
        if self._observe is not None:
            self._observe(loop.time() - self._write_started, len(group))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._queue:
            # After the requests just answered have run (their futures' callbacks are already
            # scheduled) and left the in-progress count: they must not be waited for.
            loop.call_soon(self._write_after_settle, loop)

    def _write_after_settle(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._writing is None and self._queue:
            self._write_when_gathered(loop)

    async def close(self) -> None:
        """Wait for every queued row to be committed (or to fail), then stop the writer."""
        self._gather = 0.0  # nothing more is coming: commit what is queued at once
        loop = asyncio.get_running_loop()
        while self._writing is not None or self._queue:
            if self._writing is None:
                self._write_next(loop)
            assert self._writing is not None
            await asyncio.wait([self._writing])
        self._closed = True  # no await from here on: nothing can queue behind the last commit
        self._executor.shutdown(wait=True)
