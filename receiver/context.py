"""What every handler is given: the configuration, the store, and the group committer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, ReceiverConfig
from pipeline.logs import Throttled
from pipeline.sources import SourceRegistry
from pipeline.store import Store
from pipeline.wakeup import SqliteSignal, outbox_signal
from receiver.body import BodyBudget
from receiver.commit import GroupCommitter
from receiver.counts import RequestCounts
from receiver.cors import CorsPolicy
from receiver.guard import BrowserGuard
from receiver.timeouts import sweep_bodies


class Judging:
    """How many requests are in and not yet answered (being judged or committed): the group
    committer waits for them to join its next commit (see receiver/commit.py). Counted from
    the end of the body, not its start, so a client slow to send one holds no commit back."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


@dataclass
class ReceiverContext:
    config: Config
    store: Store
    committer: GroupCommitter
    sources: SourceRegistry
    cors: CorsPolicy
    guard: BrowserGuard
    # Requests being received or committed; shutdown waits for them to be answered.
    active: set[Any] = field(default_factory=set)
    # SQLite: the socket that wakes the worker after each commit; closed once drained.
    wakeup: SqliteSignal | None = None
    judging: Judging = field(default_factory=Judging)
    # Set at shutdown: the body sweep ends, and the tally writes what it counted and ends.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Bytes held by request bodies still arriving (receiver/body.py).
    budget: BodyBudget = field(default_factory=lambda: BodyBudget(ReceiverConfig.max_buffered_bytes))
    tally_task: asyncio.Task[None] | None = None
    # Requests, messages and refusals counted for /metrics (folded into them once a second).
    counts: RequestCounts = field(default_factory=RequestCounts)
    counts_task: asyncio.Task[None] | None = None
    sweep_task: asyncio.Task[None] | None = None
    # During an outage every request fails the same way: a line a second, not a line a request.
    throttled: Throttled = field(default_factory=lambda: Throttled(logging.getLogger("trackrelay.receiver")))

    @classmethod
    def create(cls, config: Config, store: Store) -> ReceiverContext:
        signal = outbox_signal(config.database.url)
        judging = Judging()
        counts = RequestCounts()
        committer = GroupCommitter(store, max_rows=config.receiver.commit_max_rows,
                                   timeout=config.database.lock_timeout_seconds + 5,
                                   on_commit=signal.send if signal is not None else None,
                                   gather_seconds=config.receiver.commit_gather_ms / 1000, in_progress=judging, observe=counts.committed)
        cors = CorsPolicy(config)
        return cls(config=config, store=store, committer=committer, sources=SourceRegistry(config.sources),
                   wakeup=signal, judging=judging, cors=cors, guard=BrowserGuard(config, cors, counts.refused),
                   budget=BodyBudget(config.receiver.max_buffered_bytes), counts=counts)

    def reload(self, config: Config) -> None:
        """Take a reloaded config's sources (write keys), CORS policy and browser guard. The
        three are built first and assigned together, with no await in between: a request
        judged on this loop sees either the old three or the new three."""
        cors = CorsPolicy(config)
        sources, guard = SourceRegistry(config.sources), self.guard.reconfigured(config, cors)
        self.config, self.sources, self.cors, self.guard = config, sources, cors, guard

    def start(self) -> None:
        """Start the background work of a serving receiver (on the running loop): the body sweep
        (timeouts, stalled bodies, memory given back), and the tally that writes what it and the
        guard counted (always: timeouts are counted whatever else is configured)."""
        self.tally_task = asyncio.ensure_future(self.guard.run_tally(self.committer, self.stopping))
        self.sweep_task = asyncio.ensure_future(
            sweep_bodies(self.config.receiver, self.active, self.budget, self.stopping))
        self.counts.in_progress = lambda: len(self.active)
        self.counts_task = asyncio.ensure_future(self.counts.run(self.stopping))

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for active requests to be answered, then for the committer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.stopping.set()
        if self.sweep_task is not None:
            await self.sweep_task
        if self.tally_task is not None:
            await self.tally_task  # its last rows go in before the committer closes
        await self.committer.close()
        if self.counts_task is not None:
            await self.counts_task
            self.counts.fold()  # the commits close() waited for
        if self.wakeup is not None:
            self.wakeup.close()  # after the committer: its last commits still wake the worker
            self.wakeup = None
