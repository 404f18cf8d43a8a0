"""A row the database itself refuses (not an outage) is answered with a final 400, alone in
its commit group; the requests that shared the group with it are still committed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest

from conftest import RunningReceiver
from pipeline.store import RowRefused, Store

POISON = b"poison-row"


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses (as a constraint would) any transaction holding an outbox row whose
    body carries POISON. A stand-in for a value the database cannot hold: none of the real
    backends refuses anything the receiver accepts today."""
    append = Store.append

    def refuse_poison(self: Store, outbox_rows: Sequence[Mapping[str, Any]],
                      rejected_rows: Sequence[Mapping[str, Any]] = ()) -> None:
        if any(POISON in row["body"] for row in outbox_rows):
            raise RowRefused("value too long for type character varying(32)")
        append(self, outbox_rows, rejected_rows)

    monkeypatch.setattr(Store, "append", refuse_poison)


def track(event: str) -> bytes:
    return b'{"type": "track", "userId": "u1", "event": "' + event.encode() + b'"}'


def test_a_refused_row_is_a_final_400_not_a_503(refusing: None, receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/track", track(POISON.decode()))
    assert response.status_code == 400
    assert response.json()["code"] == "store_refused" and "retry-after" not in response.headers
    assert "varying" not in response.text  # the database's words stay in the log
    batch = receiver.post("/v1/batch", b'{"batch": [' + track(POISON.decode()) + b"]}")
    assert (batch.status_code, batch.json()["code"]) == (400, "store_refused")
    assert receiver.outbox() == []


def test_the_requests_sharing_its_commit_are_committed(refusing: None, receiver: RunningReceiver) -> None:
    async def send_together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=receiver.url) as client:
            bodies = [track(POISON.decode())] + [track(f"fine-{i}") for i in range(20)]
            return await asyncio.gather(*(client.post("/v1/track", content=b) for b in bodies))

    responses = asyncio.run(send_together())
    assert responses[0].status_code == 400
    assert [r.status_code for r in responses[1:]] == [200] * 20
    assert len(receiver.outbox()) == 20
