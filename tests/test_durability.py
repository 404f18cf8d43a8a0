"""200 means committed; concurrent requests share commits and none is lost; 503 while the store is down."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from conftest import RunningReceiver, unique_id
from outage import store_down
from pipeline.config import DatabaseConfig
from pipeline.store import RowRefused, Store, StoreUnavailable
from receiver.commit import GroupCommitter

STORE_UNAVAILABLE = {
    "Error": "Service Unavailable",
    "Message": "Service unavailable",
    "Details": "the event store cannot take writes now; retry later",
    "code": "store_unavailable",
    "message": "Service unavailable",
}


def track(message_id: str | None = None) -> dict[str, Any]:
    return {"userId": "u1", "event": "Signed Up", "messageId": message_id or unique_id()}


def stored_message_ids(receiver: RunningReceiver) -> list[str]:
    ids = []
    for row in receiver.outbox():
        body = json.loads(row["body"])
        ids += [m["messageId"] for m in body["batch"]] if "batch" in body else [body["messageId"]]
    return ids


def test_each_200_is_visible_from_another_connection_at_once(receiver: RunningReceiver) -> None:
    sent = []
    for _ in range(5):
        message = track()
        response = receiver.post("/v1/track", message)
        assert response.status_code == 200
        sent.append(message["messageId"])
        # receiver.store is its own engine: what it sees was committed, not just written.
        assert stored_message_ids(receiver) == sent


def test_concurrent_requests_are_all_committed_once(receiver: RunningReceiver) -> None:
    ids = [unique_id() for _ in range(200)]

    def send(chunk: list[str]) -> list[int]:
        with httpx.Client(base_url=receiver.url, timeout=30) as client:
            statuses = []
            for i, message_id in enumerate(chunk):
                if i % 2:
                    response = client.post("/v1/batch", json={"batch": [{"type": "track", **track(message_id)}]})
                else:
                    response = client.post("/v1/track", json=track(message_id))
                statuses.append(response.status_code)
            return statuses

    with ThreadPoolExecutor(20) as pool:
        statuses = [s for chunk in pool.map(send, [ids[i::20] for i in range(20)]) for s in chunk]

    assert statuses == [200] * 200
    stored = stored_message_ids(receiver)
    assert len(stored) == 200
    assert set(stored) == set(ids)


def test_writes_get_503_with_retry_after_while_the_store_is_down_then_recover(
        start_receiver: Any, database_url: str) -> None:
    receiver = start_receiver(lock_timeout_seconds=0.3)

    with store_down(database_url):
        single = receiver.post("/v1/track", track())
        batch = receiver.post("/v1/batch", {"batch": [{"type": "track", **track()}]})

    assert single.status_code == 503
    assert single.headers["Retry-After"] == "5"
    assert single.json() == STORE_UNAVAILABLE
    assert batch.status_code == 503
    assert batch.headers["Retry-After"] == "5"
    assert batch.json() == {
        "Success": False,
        "Errors": [{key: STORE_UNAVAILABLE[key] for key in ("Error", "Message", "Details", "code")}],
        "code": "store_unavailable",
        "message": "Service unavailable",
    }
    assert receiver.outbox() == []

    message = track()
    assert receiver.post("/v1/track", message).status_code == 200
    assert receiver.post("/v1/batch", {"batch": [{"type": "track", **track()}]}).status_code == 200
    assert stored_message_ids(receiver)[0] == message["messageId"]
    assert len(receiver.outbox()) == 2
    assert receiver.rejected() == []


def test_the_retry_after_header_follows_the_setting(start_receiver: Any, database_url: str) -> None:
    receiver = start_receiver(lock_timeout_seconds=0.3, retry_after_seconds=17)

    with store_down(database_url):
        response = receiver.post("/v1/page", {"userId": "u1"})

    assert (response.status_code, response.headers["Retry-After"]) == (503, "17")


def test_a_refusal_during_an_outage_is_still_answered_and_the_lost_record_is_logged(
        start_receiver: Any, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The rejected record is for operators: when it cannot be written, the client still gets
    its 400 (not a 503 it would retry forever), and the log says what was not recorded."""
    receiver = start_receiver(lock_timeout_seconds=0.3)

    with caplog.at_level(logging.WARNING, logger="trackrelay.receiver"), store_down(database_url):
        response = receiver.post("/v1/track", b"{not json")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_json"
    assert "event=rejected_not_recorded code=invalid_json" in caplog.text
    assert receiver.rejected() == []


# A held SQLite write lock leaves reads working, so /health (a read) stays 200 there; the
# Postgres outage refuses every connection.
@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_health_is_503_while_the_database_is_gone_and_200_after(start_receiver: Any, database_url: str) -> None:
    receiver = start_receiver(lock_timeout_seconds=0.3)
    assert (receiver.get("/health").status_code, receiver.get("/health").json()) == (200, {"status": "ok"})

    with store_down(database_url):
        down = receiver.get("/health")

    assert down.status_code == 503
    assert down.json()["status"] == "unavailable"
    assert (receiver.get("/health").status_code, receiver.get("/health").json()) == (200, {"status": "ok"})


def test_health_is_503_while_writes_fail_though_reads_work_and_200_once_one_commits(
        start_receiver: Any, database_url: str) -> None:
    # SQLite: a held write lock leaves reads working; before, /health answered 200 throughout.
    receiver = start_receiver(lock_timeout_seconds=0.3)
    with store_down(database_url):
        assert receiver.post("/v1/track", track()).status_code == 503
        down = receiver.get("/health")
    assert down.status_code == 503
    assert down.json()["status"] == "unavailable" and "writes failing" in down.json()["error"]
    # Nothing was sent since: /health's own write finds the store writable again.
    assert (receiver.get("/health").status_code, receiver.get("/health").json()) == (200, {"status": "ok"})
    assert receiver.post("/v1/track", track()).status_code == 200


def test_a_basic_auth_key_with_a_nul_is_stored_not_answered_503(receiver: RunningReceiver) -> None:
    # Postgres text cannot hold NUL: stored as sent, this row would be refused on every retry.
    auth = "Basic " + base64.b64encode(b"ke\x00y:").decode()

    response = receiver.post("/v1/track", track(), headers={"Authorization": auth})

    assert response.status_code == 200
    [row] = receiver.outbox()
    assert row["auth_key"] == "key"


def test_a_row_the_database_refuses_does_not_fail_the_others_of_its_group(database_url: str) -> None:
    store = Store.open(DatabaseConfig(url=database_url))
    rollbacks = []
    sa.event.listen(store.engine, "rollback", lambda conn: rollbacks.append(conn))
    committer = GroupCommitter(store)

    def row(body: bytes | None) -> dict[str, Any]:
        return {"received_at_ms": 1, "route": "track", "source": "default", "body": body}

    async def commit_together() -> list[BaseException | None]:
        # The first row is written alone; the next three queue up meanwhile and share one commit.
        results = await asyncio.gather(*(committer.commit("outbox", row(body))
                                         for body in (b"first", b"second", None, b"third")),
                                       return_exceptions=True)
        await committer.close()
        return results

    try:
        outcomes = asyncio.run(commit_together())
        assert outcomes[:2] == [None, None] and outcomes[3] is None
        # Refused alone too: the row's own fault, answered as final (not a 503 to resend forever).
        assert isinstance(outcomes[2], RowRefused)
        # Two rollbacks: the shared transaction, then the NOT NULL row on its own.
        assert len(rollbacks) == 2
        assert [r["body"] for r in store.rows("outbox")] == [b"first", b"second", b"third"]
    finally:
        store.dispose()
