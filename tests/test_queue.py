"""pipeline.queue.DeliveryQueue: claim with a lease, renew, record outcomes, take back and reap leases."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import insert, select

from pipeline.config import DatabaseConfig
from pipeline.migrate import upgrade
from pipeline.queue import OWNER_MAX_LENGTH, DeliveryQueue, ResumePoints, worker_id
from pipeline.retry import Decision
from pipeline.schema import deliveries, events
from pipeline.store import Store, now_ms
from pipeline_harness import errors_on_threads
from stored_rows import add_delivery, add_event, opened_store, rows

LONG = 60_000
SHORT = 50


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[Store]:
    yield from opened_store(postgres_url)


def delivery(store: Store, delivery_id: int) -> dict[str, Any]:
    return next(d for d in rows(store, "deliveries") if d["id"] == delivery_id)


def pending_hook_deliveries(store: Store, count: int) -> list[int]:
    return [add_delivery(store, add_event(store, f"m{i}")) for i in range(count)]


def let_short_leases_run_out() -> None:
    time.sleep(SHORT * 3 / 1000)


def test_claim_returns_due_deliveries_with_their_event_payloads(store: Store) -> None:
    now = now_ms()
    due = add_delivery(store, add_event(store, "m1"), "hook", created_at_ms=now - 5000, next_attempt_at_ms=now - 10)
    add_delivery(store, add_event(store, "later"), "hook", next_attempt_at_ms=now + LONG)
    add_delivery(store, add_event(store, "elsewhere"), "warehouse")
    add_delivery(store, add_event(store, "sent"), "hook", state="delivered", finished_at_ms=now)
    add_delivery(store, add_event(store, "given-up"), "hook", state="dead", finished_at_ms=now)

    (claimed,) = DeliveryQueue(store, "w1").claim("hook", 10, LONG)

    assert (claimed.id, claimed.attempts, claimed.created_at_ms) == (due, 1, now - 5000)
    assert claimed.event == {"type": "track", "event": "Signed Up", "userId": "u1", "messageId": "m1"}


def test_claim_counts_the_attempt_and_leases_the_row_to_its_owner(store: Store) -> None:
    (delivery_id,) = pending_hook_deliveries(store, 1)
    due_at = delivery(store, delivery_id)["next_attempt_at_ms"]

    (claimed,) = DeliveryQueue(store, "w1").claim("hook", 10, LONG)

    row = delivery(store, delivery_id)
    assert (row["state"], row["attempts"], row["locked_by"]) == ("pending", 1, claimed.lease)
    assert claimed.lease.startswith("w1:")
    assert row["locked_until_ms"] == row["last_attempt_at_ms"] + LONG
    # SQLite moves the next attempt past the lease (the next claim's range starts after the
    # rows in flight); Postgres leaves every indexed column as it was (a HOT update).
    assert row["next_attempt_at_ms"] == (due_at if store.backend == "postgresql" else row["locked_until_ms"])


def test_claim_takes_the_earliest_due_first_up_to_the_limit(store: Store) -> None:
    now = now_ms()
    ids = [add_delivery(store, add_event(store, f"m{i}"), next_attempt_at_ms=now - 1000 + i * 10) for i in range(5)]
    queue = DeliveryQueue(store, "w1")

    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[:2]
    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[2:4]
    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[4:]
    assert queue.claim("hook", 2, LONG) == []


def test_leased_deliveries_are_not_claimed_again_until_the_lease_runs_out(store: Store) -> None:
    ids = pending_hook_deliveries(store, 3)
    first, second = DeliveryQueue(store, "w1"), DeliveryQueue(store, "w2")

    assert [c.id for c in first.claim("hook", 10, SHORT)] == ids
    assert second.claim("hook", 10, SHORT) == []
    let_short_leases_run_out()

    again = second.claim("hook", 10, LONG)
    assert [(c.id, c.attempts) for c in again] == [(i, 2) for i in ids]
    assert {delivery(store, i)["locked_by"] for i in ids} == {again[0].lease}
    assert again[0].lease.startswith("w2:")


def test_renew_extends_only_the_owners_leases(store: Store) -> None:
    mine, theirs = pending_hook_deliveries(store, 2)
    queue, other = DeliveryQueue(store, "w1"), DeliveryQueue(store, "w2")
    (claimed,) = queue.claim("hook", 1, SHORT)
    other.claim("hook", 1, SHORT)
    theirs_before = delivery(store, theirs)

    mine_due_at = delivery(store, mine)["next_attempt_at_ms"]
    before = now_ms()
    assert queue.renew(claimed.lease, [mine, theirs], LONG) == 1

    row = delivery(store, mine)
    assert row["locked_until_ms"] >= before + LONG
    assert row["next_attempt_at_ms"] == (mine_due_at if store.backend == "postgresql" else row["locked_until_ms"])
    assert delivery(store, theirs) == theirs_before
    let_short_leases_run_out()
    assert [c.id for c in other.claim("hook", 10, LONG)] == [theirs]


def test_renew_ignores_deliveries_already_recorded(store: Store) -> None:
    (delivery_id,) = pending_hook_deliveries(store, 1)
    queue = DeliveryQueue(store, "w1")
    (claimed,) = queue.claim("hook", 1, LONG)
    queue.record(claimed.lease, [(delivery_id, Decision("delivered"))])

    assert queue.renew(claimed.lease, [delivery_id], LONG) == 0
    assert queue.renew(claimed.lease, [], LONG) == 0


def test_record_stores_each_outcome_and_releases_the_lease(store: Store) -> None:
    sent, later, gone = pending_hook_deliveries(store, 3)
    queue = DeliveryQueue(store, "w1")
    lease = queue.claim("hook", 10, LONG)[0].lease
    retry_at = now_ms() + 7000

    before = now_ms()
    queue.record(lease, [(sent, Decision("delivered")), (later, Decision("pending", retry_at, "HTTP 503: busy")),
                  (gone, Decision("dead", error="rejected: HTTP 400: bad"))])
    after = now_ms()

    rows_by_id = {d["id"]: d for d in rows(store, "deliveries")}
    assert {i: (d["state"], d["attempts"], d["locked_until_ms"], d["locked_by"], d["last_error"])
            for i, d in rows_by_id.items()} == {
        sent: ("delivered", 1, None, None, None),
        later: ("pending", 1, None, None, "HTTP 503: busy"),
        gone: ("dead", 1, None, None, "rejected: HTTP 400: bad")}
    assert rows_by_id[later]["next_attempt_at_ms"] == retry_at
    assert rows_by_id[later]["finished_at_ms"] is None
    assert before <= rows_by_id[sent]["finished_at_ms"] <= after
    assert before <= rows_by_id[gone]["finished_at_ms"] <= after


def test_a_retried_delivery_comes_back_when_it_is_due(store: Store) -> None:
    (delivery_id,) = pending_hook_deliveries(store, 1)
    queue = DeliveryQueue(store, "w1")
    (claimed,) = queue.claim("hook", 1, LONG)

    queue.record(claimed.lease, [(delivery_id, Decision("pending", now_ms() + LONG, "timeout"))])
    assert queue.claim("hook", 1, LONG) == []
    queue.record(claimed.lease, [])

    with store.engine.begin() as conn:
        conn.execute(deliveries.update().values(next_attempt_at_ms=now_ms() - 1))
    assert [(c.id, c.attempts) for c in queue.claim("hook", 1, LONG)] == [(delivery_id, 2)]


def test_record_is_ignored_for_a_delivery_whose_lease_another_worker_took(store: Store) -> None:
    (delivery_id,) = pending_hook_deliveries(store, 1)
    slow, fresh = DeliveryQueue(store, "slow"), DeliveryQueue(store, "fresh")
    (stale,) = slow.claim("hook", 1, SHORT)
    let_short_leases_run_out()
    (held,) = fresh.claim("hook", 1, LONG)

    slow.record(stale.lease, [(delivery_id, Decision("dead", error="rejected: late"))])
    assert (delivery(store, delivery_id)["state"], delivery(store, delivery_id)["locked_by"]) == ("pending", held.lease)

    fresh.record(held.lease, [(delivery_id, Decision("delivered"))])
    assert (delivery(store, delivery_id)["state"], delivery(store, delivery_id)["attempts"]) == ("delivered", 2)


@pytest.mark.parametrize("same_queue", [True, False], ids=["one-queue", "two-queues-one-owner"])
def test_a_stale_claim_cannot_renew_or_overwrite_the_claim_of_the_same_owner_that_took_its_rows(
        store: Store, same_queue: bool) -> None:
    """Lanes of one worker share its owner: a lane whose lease ran out may neither renew the row
    nor record over the lane that claimed it next, whether it records before or after it."""
    (delivery_id,) = pending_hook_deliveries(store, 1)
    lane_a = DeliveryQueue(store, "w1")
    lane_b = lane_a if same_queue else DeliveryQueue(store, "w1")
    (stale,) = lane_a.claim("hook", 1, SHORT)
    let_short_leases_run_out()
    (held,) = lane_b.claim("hook", 1, LONG)
    assert stale.lease != held.lease
    assert stale.lease.startswith("w1:") and held.lease.startswith("w1:")
    held_row = delivery(store, delivery_id)

    assert lane_a.renew(stale.lease, [delivery_id], LONG) == 0
    lane_a.record(stale.lease, [(delivery_id, Decision("pending", now_ms() + LONG, "HTTP 503"))])
    assert delivery(store, delivery_id) == held_row

    lane_b.record(held.lease, [(delivery_id, Decision("delivered"))])
    lane_a.record(stale.lease, [(delivery_id, Decision("dead", error="rejected: HTTP 400"))])
    row = delivery(store, delivery_id)
    assert (row["state"], row["attempts"], row["locked_by"], row["last_error"]) == ("delivered", 2, None, None)


def test_the_longest_owner_still_fits_its_lease_tokens_in_locked_by(store: Store) -> None:
    # Postgres refuses a locked_by past 64 characters; SQLite would store it silently.
    (delivery_id,) = pending_hook_deliveries(store, 1)
    queue = DeliveryQueue(store, "h" * OWNER_MAX_LENGTH)

    (claimed,) = queue.claim("hook", 1, LONG)

    assert delivery(store, delivery_id)["locked_by"] == claimed.lease
    assert len(claimed.lease.rsplit(":", 1)[0]) + len(":") + 13 <= deliveries.c.locked_by.type.length
    assert len(worker_id()) <= OWNER_MAX_LENGTH
    with pytest.raises(ValueError, match="at most 50 characters"):
        DeliveryQueue(store, "h" * (OWNER_MAX_LENGTH + 1))


def test_take_back_leases_makes_every_leased_delivery_due_now(store: Store) -> None:
    ids = pending_hook_deliveries(store, 3)
    untouched = add_delivery(store, add_event(store, "later"), next_attempt_at_ms=now_ms() + LONG)
    DeliveryQueue(store, "crashed").claim("hook", 10, LONG)

    restarted = DeliveryQueue(store, "restarted")
    assert restarted.take_back_leases() == 3

    assert {(d["locked_until_ms"], d["locked_by"]) for d in rows(store, "deliveries")} == {(None, None)}
    assert [(c.id, c.attempts) for c in restarted.claim("hook", 10, LONG)] == [(i, 2) for i in ids]
    assert (delivery(store, untouched)["attempts"], delivery(store, untouched)["next_attempt_at_ms"] > now_ms()) \
        == (0, True)
    assert DeliveryQueue(store, "x").take_back_leases() == 3


def test_release_expired_clears_only_leases_that_ran_out(store: Store) -> None:
    expired, held = pending_hook_deliveries(store, 2)
    queue = DeliveryQueue(store, "w1")
    queue.claim("hook", 1, SHORT)
    (still_held,) = queue.claim("hook", 1, LONG)
    let_short_leases_run_out()

    assert queue.release_expired() == 1
    assert queue.release_expired() == 0

    assert (delivery(store, expired)["locked_until_ms"], delivery(store, expired)["locked_by"]) == (None, None)
    assert delivery(store, held)["locked_by"] == still_held.lease
    assert [c.id for c in DeliveryQueue(store, "w2").claim("hook", 10, LONG)] == [expired]


@pytest.mark.postgres
def test_concurrent_claims_on_postgres_never_hand_out_the_same_delivery(postgres_store: Store) -> None:
    store = postgres_store
    total, threads = 2000, 8
    expected = add_many_deliveries(store, total)
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(threads)}
    count_lock = threading.Lock()
    seen = [0]

    def work(owner: str) -> None:
        queue = DeliveryQueue(store, owner)
        while True:
            got = [c.id for c in queue.claim("hook", 25, LONG)]
            claimed[owner] += got
            with count_lock:
                seen[0] += len(got)
                if seen[0] >= total and not got:
                    return

    assert errors_on_threads(work, list(claimed)) == []
    counts = Counter(i for ids in claimed.values() for i in ids)
    assert sorted(counts) == expected
    assert set(counts.values()) == {1}
    owners = {d["id"]: (d["locked_by"].rsplit(":", 1)[0], d["attempts"]) for d in rows(store, "deliveries")}
    assert owners == {i: (owner, 1) for owner, ids in claimed.items() for i in ids}
    assert sum(1 for ids in claimed.values() if ids) > 1


@pytest.mark.postgres
def test_on_postgres_a_claim_is_a_hot_update(postgres_store: Store) -> None:
    """The lease writes no indexed column, so it can be a HOT update: no index entries per
    claim (with them, a 1M-event drain was bound by the Postgres server). 40 rows fit one page
    at any fillfactor: this checks the statement and that migration 0004 set the fillfactor
    the schema names, not how many claims of a full page are HOT (the drain measured that)."""
    from pipeline.queue import _PG_CLAIM_FROM_FRONT
    from pipeline.schema import DELIVERIES_FILLFACTOR

    store = postgres_store
    ids = pending_hook_deliveries(store, 40)
    counts = "SELECT pg_stat_get_xact_tuples_updated(%s::regclass), pg_stat_get_xact_tuples_hot_updated(%s::regclass)"
    with store.engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'deliveries'").scalar_one() \
            == [f"fillfactor={DELIVERIES_FILLFACTOR}"]
        now = now_ms()
        claimed = conn.exec_driver_sql(_PG_CLAIM_FROM_FRONT, ("hook", now, now, 100, now + LONG, "w:1", now)).all()
        assert sorted(row[0] for row in claimed) == ids
        assert conn.exec_driver_sql(counts, ("deliveries", "deliveries")).one() == (40, 40)
        # The check can fail: moving next_attempt_at_ms, as claims once did, is not HOT.
        conn.exec_driver_sql("UPDATE deliveries SET next_attempt_at_ms = next_attempt_at_ms + 1")
        assert conn.exec_driver_sql(counts, ("deliveries", "deliveries")).one() == (80, 40)


@pytest.mark.postgres
def test_on_postgres_claims_in_a_backlog_start_after_the_last_row_claimed(postgres_store: Store) -> None:
    """A claimed row keeps its entry at the front of the claim index while leased, and leaves a
    dead one there once delivered, until vacuum: claims from the front stepped over all of them,
    and a 1M backlog drained at half speed."""
    store = postgres_store
    now = now_ms()
    ids = [add_delivery(store, add_event(store, f"m{i}"), next_attempt_at_ms=now - 1000 + i) for i in range(6)]
    queue = DeliveryQueue(store, "w1")
    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[:2]
    # Due before the rows already claimed, as a decoder's late commit would be.
    late = add_delivery(store, add_event(store, "late"), next_attempt_at_ms=now - 5000)

    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[2:4]
    # Short from the resume point: the rest comes from the front, the late row first.
    assert [c.id for c in queue.claim("hook", 3, LONG)] == [late, *ids[4:]]
    assert queue.claim("hook", 3, LONG) == []


@pytest.mark.postgres
def test_on_postgres_a_lease_that_ran_out_behind_the_resume_point_is_claimed_again(postgres_store: Store) -> None:
    """A leased row keeps its place in the claim order: once its lease runs out it is due
    behind the resume point, and the claim that runs short there takes it from the front."""
    store = postgres_store
    now = now_ms()
    ids = [add_delivery(store, add_event(store, f"m{i}"), next_attempt_at_ms=now - 1000 + i) for i in range(6)]
    queue = DeliveryQueue(store, "w1")
    assert [c.id for c in queue.claim("hook", 2, SHORT)] == ids[:2]
    let_short_leases_run_out()

    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[2:4]
    # Short after the point: topped up from the front, where the lapsed ids[0] is due first.
    assert [(c.id, c.attempts) for c in queue.claim("hook", 3, LONG)] == [(ids[0], 2), (ids[4], 1), (ids[5], 1)]
    # That claim's front part moved the point to ids[0]: ids[1] is next after it.
    assert [(c.id, c.attempts) for c in queue.claim("hook", 3, LONG)] == [(ids[1], 2)]
    assert queue.claim("hook", 3, LONG) == []


@pytest.mark.postgres
def test_on_postgres_a_resumed_claim_skips_rows_another_worker_leased(postgres_store: Store) -> None:
    store = postgres_store
    now = now_ms()
    ids = [add_delivery(store, add_event(store, f"m{i}"), next_attempt_at_ms=now - 1000 + i) for i in range(6)]
    first, second = DeliveryQueue(store, "w1"), DeliveryQueue(store, "w2")
    assert [c.id for c in first.claim("hook", 2, LONG)] == ids[:2]
    assert [c.id for c in second.claim("hook", 2, LONG)] == ids[2:4]

    assert first.resume_points.start("hook") is not None  # resumes after ids[1], over second's rows
    assert [c.id for c in first.claim("hook", 2, LONG)] == ids[4:]
    assert first.claim("hook", 2, LONG) == second.claim("hook", 2, LONG) == []


@pytest.mark.postgres
def test_on_postgres_a_claim_topped_up_from_the_front_resumes_after_the_rows_it_took_there(
        postgres_store: Store) -> None:
    """Rows due behind the point that outnumber a claim are then taken in order, each claim
    after the last, not by a claim from the front each time."""
    store = postgres_store
    now = now_ms()
    ids = [add_delivery(store, add_event(store, f"m{i}"), next_attempt_at_ms=now - 1000 + i) for i in range(4)]
    queue = DeliveryQueue(store, "w1")
    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[:2]
    late = [add_delivery(store, add_event(store, f"late{i}"), next_attempt_at_ms=now - 5000 + i) for i in range(4)]

    assert [c.id for c in queue.claim("hook", 3, LONG)] == [late[0], *ids[2:]]
    point = queue.resume_points.start("hook")
    assert point is not None and point.after == (now - 5000, late[0])
    assert [c.id for c in queue.claim("hook", 2, LONG)] == late[1:3]
    assert [c.id for c in queue.claim("hook", 2, LONG)] == late[3:]
    assert queue.resume_points.start("hook") is None  # that claim came back short
    assert queue.claim("hook", 2, LONG) == []


@pytest.mark.postgres
def test_on_postgres_lanes_sharing_one_queue_claim_every_delivery_once(postgres_store: Store) -> None:
    store = postgres_store
    total = 1000
    expected = add_many_deliveries(store, total)
    queue = DeliveryQueue(store, "w1")  # one worker: its lanes share the queue and its resume points
    claimed: list[list[int]] = [[] for _ in range(6)]

    def lane(mine: list[int]) -> None:
        while got := queue.claim("hook", 25, LONG):
            mine += [c.id for c in got]

    assert errors_on_threads(lane, claimed) == []
    counts = Counter(i for mine in claimed for i in mine)
    assert sorted(counts) == expected
    assert set(counts.values()) == {1}
    assert all(d["attempts"] == 1 for d in rows(store, "deliveries"))


def test_a_claim_needs_a_lease_of_at_least_a_millisecond(store: Store) -> None:
    (delivery_id,) = pending_hook_deliveries(store, 1)

    with pytest.raises(ValueError, match="at least 1 ms"):
        DeliveryQueue(store, "w1").claim("hook", 10, 0)
    assert delivery(store, delivery_id)["attempts"] == 0


@pytest.mark.postgres
def test_on_postgres_a_row_due_behind_the_resume_point_waits_at_most_its_age(postgres_store: Store) -> None:
    store = postgres_store
    now = now_ms()
    ids = [add_delivery(store, add_event(store, f"m{i}"), next_attempt_at_ms=now - 1000 + i) for i in range(4)]
    queue = DeliveryQueue(store, "w1")
    queue.resume_points = ResumePoints(max_age=0.05)
    assert [c.id for c in queue.claim("hook", 2, LONG)] == ids[:2]
    late = add_delivery(store, add_event(store, "late"), next_attempt_at_ms=now - 5000)
    time.sleep(0.1)

    assert [c.id for c in queue.claim("hook", 2, LONG)] == [late, ids[2]]


@pytest.mark.postgres
def test_on_postgres_a_resumed_claim_is_an_index_range_not_a_filter(postgres_store: Store) -> None:
    from pipeline.queue import _PG_CLAIM_AFTER

    with postgres_store.engine.begin() as conn:
        plan = [row[0].strip() for row in conn.exec_driver_sql(
            "EXPLAIN " + _PG_CLAIM_AFTER, ("hook", 10, 10, 5, 7, 100, 1, "w:1", 1))]
    (row_compare,) = [i for i, line in enumerate(plan) if "ROW(next_attempt_at_ms, id) > ROW(" in line]
    assert plan[row_compare].startswith("Index Cond: ((destination = 'hook'::text) AND "), plan
    assert "Index Scan using ix_deliveries_claim on deliveries d" in plan[row_compare - 1], plan


def add_many_deliveries(store: Store, count: int) -> list[int]:
    now = now_ms()
    with store.engine.begin() as conn:
        conn.execute(insert(events), [{
            "source": "default", "message_id": f"m{i}", "type": "track", "event_name": "E", "outbox_id": None,
            "received_at_ms": now, "payload": orjson.dumps({"messageId": f"m{i}"})} for i in range(count)])
        event_ids = conn.execute(select(events.c.id).order_by(events.c.id)).scalars().all()
        conn.execute(insert(deliveries), [{
            "event_id": i, "destination": "hook", "state": "pending", "attempts": 0, "created_at_ms": now,
            "next_attempt_at_ms": now} for i in event_ids])
        return list(conn.execute(select(deliveries.c.id).order_by(deliveries.c.id)).scalars())


def test_an_error_holding_nul_is_recorded_without_it_and_with_the_rest_of_the_batch(store: Store) -> None:
    sent, later = pending_hook_deliveries(store, 2)
    queue = DeliveryQueue(store, "w1")
    lease = queue.claim("hook", 10, LONG)[0].lease

    queue.record(lease, [(sent, Decision("delivered")), (later, Decision("pending", now_ms(), "HTTP 503: a\x00b"))])

    assert [(d["state"], d["last_error"]) for d in rows(store, "deliveries")] == [
        ("delivered", None), ("pending", "HTTP 503: ab")]


def test_recording_outcomes_on_sqlite_looks_rows_up_by_id_not_by_walking_the_pending_ones(tmp_path: Path) -> None:
    """With the state index, SQLite walked every pending delivery to record 100 outcomes: a
    1M-event drain delivered at a sixth of a 10k one's rate."""
    from pipeline.queue import _SQLITE_DELIVERED

    store = Store.open(DatabaseConfig(url=f"sqlite:///{tmp_path / 'plan.db'}"))
    try:
        upgrade(store.engine)
        with store.engine.connect() as conn:
            plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + _SQLITE_DELIVERED, (1, "w:1", "[1]"))]
    finally:
        store.dispose()
    assert plan[0] == "SEARCH deliveries USING INTEGER PRIMARY KEY (rowid=?)", plan
