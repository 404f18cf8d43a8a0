"""Per-user ordering (a destination's ``ordering = "user"``): one user's events reach it in order,
a retry holds that user's later events back and nobody else's, a dead event releases them.

First the queue alone (claims on stored rows, both backends, and concurrent claims), then the
whole pipeline: receiver, worker thread and a scripted HTTP sink.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from conftest import RunningReceiver, unique_id
from http_sink import Answer, Recorded
from pipeline.config import ConfigError, DatabaseConfig
from pipeline.decoder import Decoder
from pipeline.operations import replay_deliveries
from pipeline.queue import DeliveryQueue
from pipeline.retry import DEAD, DELIVERED, PENDING, Decision
from pipeline.schema import deliveries
from pipeline.store import Store, now_ms
from pipeline_harness import (Database, Pipeline, ScriptedSink, ThreadWorker, errors_on_threads, read_config, wait_for,
                              webhook, write_config)
from stored_rows import add_delivery, add_event, insert_rows, opened_store, outbox_row, rows

LONG = 60_000


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


def ordered_delivery(store: Store, user: str | None, message_id: str | None = None, destination: str = "hook",
                     **values: Any) -> int:
    """A pending delivery as the decoder stores it for an ordered destination."""
    delivery_id = add_delivery(store, add_event(store, message_id or unique_id()), destination, **values)
    with store.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(user_key=user))
    return delivery_id


def claimed_ids(queue: DeliveryQueue, limit: int = 100) -> list[int]:
    return [c.id for c in queue.claim("hook", limit, LONG)]


# --- the queue ---------------------------------------------------------------------------------

def test_a_claim_takes_only_each_users_earliest_pending_delivery(store: Store) -> None:
    a1, b1, a2, none1, b2, none2 = (ordered_delivery(store, user) for user in ("a", "b", "a", None, "b", None))
    queue = DeliveryQueue(store, "w1")

    first = queue.claim("hook", 100, LONG)
    # Deliveries without a user key (neither id, or an unordered destination) are not held.
    assert [c.id for c in first] == [a1, b1, none1, none2]
    assert claimed_ids(queue) == []  # a2 and b2 wait while a1 and b1 are in flight

    queue.record(first[0].lease, [(a1, Decision(DELIVERED))])
    assert claimed_ids(queue) == [a2]


def test_a_retry_holds_the_users_later_deliveries_until_it_is_delivered(store: Store) -> None:
    first, second, third = (ordered_delivery(store, "a") for _ in range(3))
    other = ordered_delivery(store, "b")
    queue = DeliveryQueue(store, "w1")
    (claimed,) = [c for c in queue.claim("hook", 100, LONG) if c.id == first]

    # Retried (due again at once): the later ones still wait for it, the other user does not.
    queue.record(claimed.lease, [(first, Decision(PENDING, now_ms(), "HTTP 500"))])
    again = queue.claim("hook", 100, LONG)
    assert [c.id for c in again] == [first]
    assert other not in [c.id for c in again]  # claimed by the first claim already

    queue.record(again[0].lease, [(first, Decision(DELIVERED))])
    (claimed_second,) = queue.claim("hook", 100, LONG)
    assert claimed_second.id == second
    queue.record(claimed_second.lease, [(second, Decision(DELIVERED))])
    assert claimed_ids(queue) == [third]


def test_a_retry_moves_the_held_deliveries_next_attempt_to_its_own(store: Store) -> None:
    head, later, latest = (ordered_delivery(store, "a") for _ in range(3))
    unordered = ordered_delivery(store, None)
    queue = DeliveryQueue(store, "w1")
    claimed = queue.claim("hook", 100, LONG)
    retry_at = now_ms() + LONG

    queue.record(claimed[0].lease, [(head, Decision(PENDING, retry_at, "HTTP 500")),
                                    (unordered, Decision(PENDING, retry_at + 1, "HTTP 500"))])

    by_id = {r["id"]: r for r in rows(store, "deliveries")}
    # Held back to the head's retry, so that claims until then do not step over them.
    assert [by_id[i]["next_attempt_at_ms"] for i in (head, later, latest)] == [retry_at] * 3
    assert by_id[unordered]["next_attempt_at_ms"] == retry_at + 1
    assert claimed_ids(queue) == []


def test_a_retry_recorded_by_a_lane_that_lost_its_lease_moves_nothing(store: Store) -> None:
    head, later = (ordered_delivery(store, "a") for _ in range(2))
    queue = DeliveryQueue(store, "w1")
    (stale,) = queue.claim("hook", 100, 50)
    wait_for(lambda: now_ms() > stale_until(store, head), "the lease to run out")
    (current,) = queue.claim("hook", 100, LONG)
    later_due = next(r for r in rows(store, "deliveries") if r["id"] == later)["next_attempt_at_ms"]

    queue.record(stale.lease, [(head, Decision(PENDING, now_ms() + LONG, "HTTP 500"))])

    by_id = {r["id"]: r for r in rows(store, "deliveries")}
    assert by_id[head]["locked_by"] == current.lease
    assert by_id[later]["next_attempt_at_ms"] == later_due


def stale_until(store: Store, delivery_id: int) -> int:
    return next(r for r in rows(store, "deliveries") if r["id"] == delivery_id)["locked_until_ms"]


def test_a_dead_delivery_releases_the_users_later_ones_and_replay_delivers_it_after_them(store: Store) -> None:
    first, second = (ordered_delivery(store, "a") for _ in range(2))
    queue = DeliveryQueue(store, "w1")
    (claimed,) = queue.claim("hook", 100, LONG)

    queue.record(claimed.lease, [(first, Decision(DEAD, error="gave up"))])
    (released,) = queue.claim("hook", 100, LONG)
    assert released.id == second

    # Replayed while the later one is in flight: pending again, it waits for nothing earlier,
    # so it goes out beside (or after) the later one. Replay does not reorder history.
    assert replay_deliveries(store, "hook", ids=[first]) == 1
    assert claimed_ids(queue) == [first]


def test_ordering_is_per_destination(store: Store) -> None:
    here = ordered_delivery(store, "a", destination="hook")
    ordered_delivery(store, "a", destination="hook")
    elsewhere = ordered_delivery(store, "a", destination="warehouse")

    assert claimed_ids(DeliveryQueue(store, "w1")) == [here]
    assert [c.id for c in DeliveryQueue(store, "w1").claim("warehouse", 100, LONG)] == [elsewhere]


def test_concurrent_claims_never_hold_two_deliveries_of_one_user(store: Store) -> None:
    users = [f"u{i}" for i in range(40)]
    owner = {ordered_delivery(store, user): user for _ in range(3) for user in users}
    queues = [DeliveryQueue(store, f"w{i}") for i in range(4)]
    start = threading.Barrier(len(queues))
    taken: list[int] = []

    def claim(queue: DeliveryQueue) -> None:
        start.wait(10)
        for _ in range(5):
            taken.extend(c.id for c in queue.claim("hook", 7, LONG))

    assert errors_on_threads(claim, queues) == []

    # Every user's first delivery, each exactly once; none of anyone's later ones.
    assert sorted(owner[i] for i in taken) == sorted(users)
    assert sorted(taken) == sorted(min(i for i, u in owner.items() if u == user) for user in users)


@pytest.mark.postgres
def test_two_decoders_on_postgres_store_an_ordered_destinations_deliveries_in_outbox_order(
        postgres_url: str, tmp_path: Path) -> None:
    config = read_config(write_config(tmp_path / "trackrelay.toml", postgres_url,
                                      [webhook("http://127.0.0.1:9/in", ordering="user")]))
    for store in opened_store(postgres_url):
        insert_rows(store, "outbox", [outbox_row({"batch": user_events("u", 1)}) for _ in range(60)])
        decoders = [Decoder(store, config) for _ in range(2)]

        def decode_one_row_at_a_time(decoder: Decoder) -> None:
            while decoder.decode_pending(limit=1).rows:
                pass

        assert errors_on_threads(decode_one_row_at_a_time, decoders) == []

        # Side by side, the later row's group could take its ids or commit first; decode
        # transactions take turns instead, so delivery ids follow the outbox.
        outbox_of = {e["id"]: e["outbox_id"] for e in rows(store, "events")}
        stored = [outbox_of[d["event_id"]] for d in rows(store, "deliveries")]
        assert len(stored) == 60 and stored == sorted(stored)
        assert {d["user_key"] for d in rows(store, "deliveries")} == {"u"}


# --- the pipeline --------------------------------------------------------------------------------

def user_events(user: str, count: int) -> list[dict[str, Any]]:
    return [{"type": "track", "event": f"Step {i}", "userId": user, "messageId": f"{user}-{i}-{unique_id()}"}
            for i in range(count)]


def interleaved(*streams: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for round_ in zip(*streams) for event in round_]


def send(receiver: RunningReceiver, messages: list[dict[str, Any]]) -> None:
    response = receiver.post("/v1/batch", {"batch": messages})
    assert (response.status_code, response.json()) == (200, {"Success": True})


def arrivals(sink: ScriptedSink, user: str) -> list[tuple[str, int]]:
    """(messageId, status) of every request for ``user``'s events, in the order they arrived."""
    return [(ids[0], answer.status) for recorded, ids, answer in list(sink.answered)
            if recorded.json().get("userId") == user]


def delivered_ids(sink: ScriptedSink, user: str) -> list[str]:
    return [message_id for message_id, status in arrivals(sink, user) if status == 200]


class FailingOne:
    """Answers 500 to one messageId for at least ``times`` requests and until released; 200 otherwise."""

    def __init__(self, message_id: str, times: int) -> None:
        self.message_id, self.times = message_id, times
        self.failed = 0
        self.released = threading.Event()

    def __call__(self, n: int, recorded: Recorded) -> Answer:
        if recorded.json()["messageId"] != self.message_id:
            return Answer()
        if self.failed < self.times or not self.released.is_set():
            self.failed += 1
            return Answer(500, b"try again")
        return Answer()


def test_a_failing_event_holds_back_its_users_later_events_and_nobody_elses(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    held, free = user_events("held", 5), user_events("free", 5)
    failing = FailingOne(held[1]["messageId"], times=3)
    sink.decide = failing
    pipeline = start_pipeline([webhook(sink.url, ordering="user", max_attempts=1000)])

    send(pipeline.receiver, interleaved(held, free))
    # The other user's events all arrive while the failing one is still being retried...
    wait_for(lambda: failing.failed >= 3 and len(delivered_ids(sink, "free")) == 5,
             "three failures and every event of the other user")
    assert delivered_ids(sink, "free") == [m["messageId"] for m in free]
    # ...and the held user's later events were not even tried.
    assert {message_id for message_id, _ in arrivals(sink, "held")} == {held[0]["messageId"], held[1]["messageId"]}

    failing.released.set()
    wait_for(lambda: pipeline.db.settled(10), "every delivery to settle")

    assert delivered_ids(sink, "held") == [m["messageId"] for m in held]
    assert [status for message_id, status in arrivals(sink, "held") if message_id == held[1]["messageId"]][-1] == 200
    assert pipeline.db.states() == {"delivered": 10}


def test_a_dead_event_releases_its_users_later_events_and_stays_replayable(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    events = user_events("u", 4)
    dying = events[1]["messageId"]
    refusing = threading.Event()
    refusing.set()
    sink.decide = lambda n, r: (Answer(500, b"down") if refusing.is_set() and r.json()["messageId"] == dying
                                else Answer())
    pipeline = start_pipeline([webhook(sink.url, ordering="user", max_attempts=2)])

    send(pipeline.receiver, events)
    wait_for(lambda: pipeline.db.settled(4), "every delivery to settle")

    order = arrivals(sink, "u")
    assert order == [(events[0]["messageId"], 200), (dying, 500), (dying, 500),
                     (events[2]["messageId"], 200), (events[3]["messageId"], 200)]
    by_message = {r["message_id"]: r["state"] for r in pipeline.db.deliveries()}
    assert by_message[dying] == "dead"

    refusing.clear()
    store = Store.open(DatabaseConfig(url=pipeline.config.database.url))
    try:
        assert replay_deliveries(store, "hook") == 1
    finally:
        store.dispose()
    wait_for(lambda: pipeline.db.states() == {"delivered": 4}, "the replayed delivery")
    assert arrivals(sink, "u")[-1] == (dying, 200)  # after the later ones: replay does not reorder history


def test_without_ordering_a_retry_holds_nothing_back(start_pipeline: Callable[..., Pipeline],
                                                     sink: ScriptedSink) -> None:
    events = user_events("u", 4)
    failing = FailingOne(events[0]["messageId"], times=1)
    sink.decide = failing
    pipeline = start_pipeline([webhook(sink.url, max_attempts=1000)])

    send(pipeline.receiver, events)
    wait_for(lambda: len(delivered_ids(sink, "u")) == 3, "the three events that do not fail")
    failing.released.set()
    wait_for(lambda: pipeline.db.settled(4), "every delivery to settle")

    assert delivered_ids(sink, "u")[-1] == events[0]["messageId"]
    assert {r["user_key"] for r in pipeline.db.deliveries()} == {None}  # nothing stored for order


@pytest.mark.postgres
def test_two_workers_on_postgres_keep_each_users_order(postgres_url: str, tmp_path: Path, sink: ScriptedSink) -> None:
    users = [f"user-{i}" for i in range(12)]
    streams = [user_events(user, 8) for user in users]
    tried: dict[str, int] = {}

    def decide(n: int, recorded: Recorded) -> Answer:
        # Every third event fails its first attempt; answers are a little slow, so that the two
        # workers' claims overlap.
        message_id = recorded.json()["messageId"]
        tried[message_id] = tried.get(message_id, 0) + 1
        index = int(message_id.split("-")[2])
        return Answer(500, delay=0.005) if index % 3 == 1 and tried[message_id] == 1 else Answer(delay=0.005)

    sink.decide = decide
    # Each worker holds at most 4 events (2 requests in flight, claims of 2): fewer than the 12
    # users' first events, so both take part from the first claims on. (A worker with room for
    # them all took every one, and, recording each user's release itself, the next ones too.)
    configs = [read_config(write_config(tmp_path / f"worker-{name}.toml", postgres_url,
                                        [webhook(sink.url, ordering="user", claim_size=2, concurrency=2,
                                                 max_attempts=100, headers={"X-Worker": name})]))
               for name in ("a", "b")]
    receiver = RunningReceiver(configs[0])
    db = Database(postgres_url)
    workers = [ThreadWorker(config) for config in configs]
    try:
        for start in range(0, 8, 2):  # a request at a time, each with two events of every user
            send(receiver, [event for stream in streams for event in stream[start:start + 2]])
        wait_for(lambda: db.settled(len(users) * 8), "every delivery to settle", timeout=60)

        for user, stream in zip(users, streams):
            expected = [m["messageId"] for m in stream]
            assert delivered_ids(sink, user) == expected
            # In arrival order, a request never goes back to an earlier event: a later event
            # was never tried before the earlier one's retry.
            seen = [expected.index(message_id) for message_id, _ in arrivals(sink, user)]
            assert seen == sorted(seen), (user, seen)
        workers_seen = {recorded.headers["X-Worker"] for recorded, _, _ in sink.answered}
        assert workers_seen == {"a", "b"}
    finally:
        for worker in workers:
            worker.stop()
        receiver.stop()
        db.dispose()


# --- configuration -------------------------------------------------------------------------------

def test_ordering_is_none_or_user(tmp_path: Path) -> None:
    path = write_config(tmp_path / "trackrelay.toml", "sqlite:///x.db",
                        [webhook("http://127.0.0.1:9/in", name="plain"),
                         webhook("http://127.0.0.1:9/in", name="ordered", ordering="user")])
    assert [d.ordering for d in read_config(path).destinations] == ["none", "user"]

    write_config(path, "sqlite:///x.db", [webhook("http://127.0.0.1:9/in", name="crm", ordering="timestamp")])
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    assert str(caught.value) == "[[destinations]] crm ordering: must be one of 'none', 'user', got 'timestamp'"
