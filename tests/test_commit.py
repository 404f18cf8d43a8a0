"""The group committer's watchdog: a commit that hangs answers everyone waiting, in time."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from pipeline.config import DatabaseConfig
from pipeline.migrate import upgrade
from pipeline.store import Store, StoreUnavailable, now_ms
from receiver.commit import GroupCommitter


def outbox_row(body: bytes) -> dict[str, object]:
    return {"received_at_ms": now_ms(), "route": "track", "source": "default", "body": body}


def test_a_hung_commit_fails_the_waiting_requests_after_the_timeout_and_recovers(tmp_path: Path) -> None:
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
    assert waited < 2.0, "the watchdog answered before the database's own 3 s lock timeout"
    assert after == [None]
    bodies = [row["body"] for row in store.rows("outbox")]
    store.dispose()
    assert b'{"n": 3}' in bodies and b'{"n": 2}' not in bodies  # the dropped queue was never written
