"""The group committer: its watchdog (a commit that hangs answers everyone waiting, in time) and
its gathering of the requests being judged into one commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import DatabaseConfig, load_config
from pipeline.migrate import upgrade
from pipeline.store import Store, StoreUnavailable, now_ms
from receiver.commit import GroupCommitter
from receiver.context import ReceiverContext


def outbox_row(body: bytes) -> dict[str, object]:
    return {"received_at_ms": now_ms(), "route": "track", "source": "default", "body": body}


def test_a_hung_commit_fails_the_waiting_requests_after_the_timeout_and_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'commit.db'}"
    # The write itself would wait up to 3 s for the lock; the committer gives up after 0.3 s.
    store = Store.open(DatabaseConfig(url=url, lock_timeout_seconds=3.0))
    upgrade(store.engine)
    blocker = sqlite3.connect(tmp_path / "commit.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")

    async def scenario() -> tuple[list[object], float, list[object]]:
        committer = GroupCommitter(store, timeout=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(committer.commit("outbox", outbox_row(b'{"n": 1}')))
        await asyncio.sleep(0.05)  # the second one queues behind the hung commit
        second = asyncio.ensure_future(committer.commit("outbox", outbox_row(b'{"n": 2}')))
        stalled = await asyncio.gather(first, second, return_exceptions=True)
        waited = loop.time() - started
        blocker.execute("ROLLBACK")
        after = await asyncio.gather(committer.commit("outbox", outbox_row(b'{"n": 3}')), return_exceptions=True)
        await committer.close()
        return stalled, waited, after

    try:
        stalled, waited, after = asyncio.run(scenario())
    finally:
        blocker.close()
    assert [type(outcome) for outcome in stalled] == [StoreUnavailable, StoreUnavailable]
    stalls = [r.getMessage() for r in caplog.records if "event=commit_stalled" in r.getMessage()]
    assert stalls[0] == "event=commit_stalled timeout=0.3 waiting=2"
    assert waited < 2.0, "the watchdog answered before the database's own 3 s lock timeout"
    assert after == [None]
    bodies = [row["body"] for row in store.rows("outbox")]
    store.dispose()
    assert b'{"n": 3}' in bodies and b'{"n": 2}' not in bodies  # the dropped queue was never written


class CountingStore(Store):
    """A real SQLite store that also remembers how many rows each of its commits held."""

    def __init__(self, url: str) -> None:
        super().__init__(Store.open(DatabaseConfig(url=url)).engine)
        upgrade(self.engine)
        self.groups: list[int] = []

    def append(self, outbox_rows: Sequence[Mapping[str, Any]],
               rejected_rows: Sequence[Mapping[str, Any]] = ()) -> None:
        super().append(outbox_rows, rejected_rows)
        self.groups.append(len(outbox_rows) + len(rejected_rows))


def gathering(store: Store, in_progress: int, gather_seconds: float) -> GroupCommitter:
    return GroupCommitter(store, gather_seconds=gather_seconds, in_progress=lambda: in_progress)


def one_commit(store: Store, in_progress: int, gather_seconds: float) -> float:
    """Commit one row with ``in_progress`` requests counted; seconds until it was committed."""

    async def scenario() -> float:
        committer = gathering(store, in_progress, gather_seconds)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await committer.commit("outbox", outbox_row(b'{"n": 1}'))
        waited = loop.time() - started
        await committer.close()
        return waited

    return asyncio.run(scenario())


def test_a_commit_waits_for_the_requests_in_progress_and_takes_them_all_in_one_group(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path / 'gather.db'}")

    async def scenario() -> float:
        committer = gathering(store, in_progress=3, gather_seconds=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def request(n: int) -> None:
            await asyncio.sleep(0.02 * n)  # still being read when the first row queues
            await committer.commit("outbox", outbox_row(b'{"n": %d}' % n))

        await asyncio.gather(*(request(n) for n in range(3)))
        waited = loop.time() - started
        await committer.close()
        return waited

    waited = asyncio.run(scenario())
    assert store.groups == [3]
    assert waited < 2.0, "the commit started when the last request in progress queued, not at the 5 s bound"
    assert len(store.rows("outbox")) == 3
    store.dispose()


def test_a_request_alone_is_committed_at_once(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path / 'alone.db'}")

    waited = one_commit(store, in_progress=1, gather_seconds=5.0)
    assert waited < 2.0, "nothing else was in progress: the commit must not wait 5 s"
    assert store.groups == [1]
    store.dispose()


def test_the_wait_for_requests_in_progress_is_bounded(tmp_path: Path) -> None:
    """Requests counted in progress that never queue a row (a client that stalls mid-body, one
    that disconnected) hold a commit back for gather_seconds at most."""
    store = CountingStore(f"sqlite:///{tmp_path / 'bounded.db'}")

    waited = one_commit(store, in_progress=5, gather_seconds=0.3)
    assert 0.25 <= waited < 3.0
    assert store.groups == [1]
    store.dispose()


def test_close_commits_a_gathering_group_at_once(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path / 'close.db'}")

    async def scenario() -> tuple[list[object], float]:
        # Four requests always in progress: every commit would wait the whole 10 s bound.
        committer = gathering(store, in_progress=4, gather_seconds=10.0)
        loop = asyncio.get_running_loop()
        pending = [asyncio.ensure_future(committer.commit("outbox", outbox_row(b'{"n": %d}' % n)))
                   for n in range(2)]
        await asyncio.sleep(0.05)
        started = loop.time()
        await committer.close()
        closed_in = loop.time() - started
        return await asyncio.gather(*pending), closed_in

    outcomes, closed_in = asyncio.run(scenario())
    assert outcomes == [None, None]
    assert closed_in < 5.0, "close() committed the gathering group at once"
    assert store.groups == [2]
    store.dispose()


def test_requests_answered_by_the_last_commit_are_not_waited_for(tmp_path: Path) -> None:
    """As in the receiver: a request is in progress from its headers until its answer. When a
    commit lands, its requests are answered on the next turn of the loop; the next commit
    must count only the requests still in progress, or it would wait out its whole bound."""
    store = CountingStore(f"sqlite:///{tmp_path / 'answered.db'}")

    async def scenario() -> float:
        active: set[int] = set()
        committer = GroupCommitter(store, gather_seconds=5.0, in_progress=active.__len__)
        loop = asyncio.get_running_loop()

        async def request(n: int) -> None:
            active.add(n)
            try:
                await committer.commit("outbox", outbox_row(b'{"n": %d}' % n))
            finally:
                active.discard(n)

        started = loop.time()
        first = asyncio.ensure_future(request(0))
        await asyncio.sleep(0)  # the first commit starts alone
        await asyncio.gather(first, request(1), request(2))
        waited = loop.time() - started
        await committer.close()
        return waited

    waited = asyncio.run(scenario())
    assert store.groups == [1, 2]
    assert waited < 2.0, "the second commit waited for a request the first one had answered"
    store.dispose()


@pytest.mark.parametrize(("gather_seconds", "groups"), [(0.0, [1, 1]), (0.3, [2])])
def test_without_gathering_a_commit_never_waits_for_requests_in_progress(
        tmp_path: Path, gather_seconds: float, groups: list[int]) -> None:
    """Two rows queued in one turn of the loop while five requests count as in progress: off,
    the first commits alone at once and the second follows; on, they wait and share one."""
    store = CountingStore(f"sqlite:///{tmp_path / 'off.db'}")

    async def scenario() -> None:
        committer = gathering(store, in_progress=5, gather_seconds=gather_seconds)
        await asyncio.wait_for(asyncio.gather(*(committer.commit("outbox", outbox_row(b'{"n": %d}' % n))
                                                for n in range(2))), timeout=10)
        await committer.close()

    asyncio.run(scenario())
    assert store.groups == groups
    store.dispose()


def test_gathering_needs_a_count_of_the_requests_in_progress(tmp_path: Path) -> None:
    store = CountingStore(f"sqlite:///{tmp_path / 'count.db'}")
    with pytest.raises(ValueError, match="in_progress"):
        GroupCommitter(store, gather_seconds=0.01)
    store.dispose()


@pytest.mark.parametrize(("judging", "waits"), [(1, False), (3, True)])
def test_the_receiver_context_gathers_for_commit_gather_ms_while_other_requests_are_being_judged(
        tmp_path: Path, judging: int, waits: bool) -> None:
    """The wiring: the context's committer counts ctx.judging (what IngestRequest counts from
    a body's end to its answer) and waits commit_gather_ms, in milliseconds."""
    url = f"sqlite:///{tmp_path / 'context.db'}"
    config = load_config(None, env={"TRACKRELAY_DATABASE_URL": url, "TRACKRELAY_RECEIVER_COMMIT_GATHER_MS": "400"})
    store = Store.open(config.database)
    upgrade(store.engine)

    async def scenario() -> float:
        ctx = ReceiverContext.create(config, store)
        ctx.judging.count = judging  # this request, and judging - 1 others that never queue
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ctx.committer.commit("outbox", outbox_row(b'{"n": 1}'))
        waited = loop.time() - started
        await ctx.drain(timeout=1.0)
        return waited

    waited = asyncio.run(scenario())
    store.dispose()
    if waits:
        assert 0.35 <= waited < 5.0, waited
    else:
        assert waited < 0.35, waited


def test_a_row_that_comes_after_close_is_store_unavailable_not_a_thread_pool_error(tmp_path: Path) -> None:
    """A stopping receiver closes its committer once no request is active, while a kept-alive
    connection may still deliver one (tests/reliability/test_receiver_kill.py): that request
    must get a 503 to retry, not a 500 from the executor that was shut down."""
    store = CountingStore(f"sqlite:///{tmp_path / 'after-close.db'}")

    async def scenario() -> list[object]:
        committer = GroupCommitter(store)
        await committer.commit("outbox", outbox_row(b'{"n": 1}'))
        await committer.close()
        return await asyncio.gather(committer.commit("outbox", outbox_row(b'{"n": 2}')), return_exceptions=True)

    [late] = asyncio.run(scenario())
    assert isinstance(late, StoreUnavailable), repr(late)
    assert store.groups == [1]
    store.dispose()
