"""The delivery queue: claim due deliveries with a lease, renew it, record outcomes.

Contract (every call is blocking and runs its own short transaction):
- ``claim(destination, limit, lease_ms)`` leases up to ``limit`` due deliveries under a new
  lease token, ``<worker id>:<claim number>``, stored in ``locked_by`` and on each ``Claimed``:
  their ``attempts`` go up by one and ``locked_until_ms`` moves to the end of the lease. A
  delivery is due when it is pending, its ``next_attempt_at_ms`` has come and it holds no lease
  that is still running: nobody else can claim it until the lease runs out. On SQLite the claim
  also moves ``next_attempt_at_ms`` to the lease's end, so that the next claim's index range
  starts past the rows in flight; on Postgres it leaves every indexed column alone, so that a
  claim is a HOT update (see ``_PG_CLAIM``). A lease has run out once ``locked_until_ms <=
  now``. On Postgres several workers claim concurrently (``FOR UPDATE SKIP LOCKED``), and while
  a backlog lasts each claim starts after the last row the queue claimed for that destination
  (see ``ResumePoints``): the oldest due rows first, give or take rows that became due behind
  that point (a lease that ran out among them), which a claim from the front takes within
  ``RESUME_SECONDS``, or as soon as the backlog runs short.
- Per-user ordering: a delivery with a ``user_key`` (the decoder sets one only for a destination
  with ``ordering = "user"``) is due only while no earlier delivery (lower id) of that user to
  that destination is pending, so a claim never takes a user's later delivery while an earlier
  one is due, leased or waiting for a retry, and at most one of a user's deliveries per
  destination is leased at a time (a replayed one aside: see the README). That holds across
  concurrent claims on Postgres: leasing leaves ``state`` alone, so every claim sees the
  earlier delivery pending until the transaction recording its outcome has committed. A dead
  delivery no longer holds anything.
- ``renew(lease, ids, lease_ms)`` extends the rows that lease still holds; others are ignored.
- ``record(lease, decisions)`` stores outcomes in one transaction, only for rows that lease
  still holds. The token is per claim, not per worker: a worker's lanes claim side by side, and
  a lane whose lease ran out must not overwrite the result of the lane that claimed the row next.
  A retry of an ordered delivery also moves its user's later pending deliveries' next attempt
  up to its own (they could not be claimed before it anyway).
- ``take_back_leases()`` makes every leased delivery due now: only safe when no other worker
  can be running (SQLite, at start-up).
- ``release_expired()`` clears leases that ran out (the lease reaper); repeating it is harmless.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, bindparam, text, update

from pipeline import exactjson
from pipeline.retry import DEAD, DELIVERED, Decision
from pipeline.schema import deliveries
from pipeline.store import Store, now_ms


# The hot statements as fixed text for the driver: no per-call compilation or rendering.
_CLAIM_ORDER = "ORDER BY d.next_attempt_at_ms, d.id"
_NOT_LEASED = "(d.locked_until_ms IS NULL OR d.locked_until_ms <= {now})"
# Per-user ordering: a delivery with a user_key (only an ordered destination's have one) is
# due only while no earlier delivery of that user to that destination is pending, whether
# due, leased or waiting for a retry; so at most one of a user's deliveries is ever claimed.
# One probe of ix_deliveries_user_order (partial: pending ordered rows only) per candidate; an
# unordered row stops at "IS NULL". The lease does not change state, so a concurrent claim
# sees the earlier delivery pending until its outcome is committed (see the module docstring).
_FIRST_OF_USER = ("(d.user_key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries p "
                  "WHERE p.destination = d.destination AND p.user_key = d.user_key "
                  "AND p.state = 'pending' AND p.id < d.id))")
_SQLITE_DUE = ("SELECT d.id, d.attempts, d.created_at_ms, e.payload, e.received_at_ms FROM deliveries d "
               "JOIN events e ON e.id = d.event_id "
               "WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at_ms <= ? "
               f"AND {_NOT_LEASED.format(now='?')} AND {_FIRST_OF_USER} {_CLAIM_ORDER} LIMIT ?")
_SQLITE_LEASE = ("UPDATE deliveries SET attempts = attempts + 1, locked_until_ms = ?, next_attempt_at_ms = ?, "
                 "locked_by = ?, last_attempt_at_ms = ? WHERE id IN (SELECT value FROM json_each(?))")
# Postgres: the lease changes no indexed column, and deliveries' fillfactor (migration 0004)
# leaves room on each page, so the new row version is a HOT update: no new entry in any of the
# table's four indexes. Moving next_attempt_at_ms as SQLite does made every claim a non-HOT
# update, and with a 1M backlog the server, not the worker, set the drain's pace.
_PG_CLAIM = ("WITH due AS (SELECT d.id, d.next_attempt_at_ms AS due_at FROM deliveries d "
             "WHERE d.destination = %s AND d.state = 'pending' AND d.next_attempt_at_ms <= %s "
             f"AND {_NOT_LEASED.format(now='%s')} AND {_FIRST_OF_USER} {{after}}"
             f"{_CLAIM_ORDER} LIMIT %s FOR UPDATE SKIP LOCKED) "
             "UPDATE deliveries SET attempts = deliveries.attempts + 1, locked_until_ms = %s, "
             "locked_by = %s, last_attempt_at_ms = %s "
             "FROM due, events e WHERE deliveries.id = due.id AND e.id = deliveries.event_id "
             "RETURNING deliveries.id, deliveries.attempts - 1, deliveries.created_at_ms, e.payload, e.received_at_ms, "
             "due.due_at")
_PG_CLAIM_FROM_FRONT = _PG_CLAIM.format(after="")
_PG_CLAIM_AFTER = _PG_CLAIM.format(after="AND (d.next_attempt_at_ms, d.id) > (%s, %s) ")
_DELIVERED_SET = ("UPDATE deliveries SET state = 'delivered', finished_at_ms = {mark}, locked_until_ms = NULL, "
                  "locked_by = NULL, last_error = NULL WHERE locked_by = {mark} AND {state} = 'pending' AND ")
# "+state" keeps SQLite off ix_deliveries_state_finished_at_ms: with it, SQLite walked every
# pending delivery and tested its id against the list, so recording 100 outcomes cost as much
# as the whole backlog (a 1M-event drain delivered 6.6k events/s, a 10k one 32-46k).
_SQLITE_DELIVERED = _DELIVERED_SET.format(mark="?", state="+state") + "id IN (SELECT value FROM json_each(?))"
_PG_DELIVERED = _DELIVERED_SET.format(mark="%s", state="state") + "id = ANY(%b::bigint[])"  # binary: see decoder
# A retried ordered delivery holds its user's later ones back until its next attempt: move
# theirs there too, so that claims do not step over them, due but held, at every round (with
# 100k held deliveries a claim took 90 ms on SQLite, 620 ms on Postgres). The head's key is
# read back only if the retry was just recorded for it (no lease, the new next attempt), so a
# lane whose lease ran out moves nothing; an unordered delivery has no key and matches nothing.
_SQLITE_HOLD_LATER = text(
    "UPDATE deliveries SET next_attempt_at_ms = :b_next WHERE state = 'pending' AND id > :b_id "
    "AND destination = (SELECT h.destination FROM deliveries h WHERE h.id = :b_id) "
    "AND user_key = (SELECT h.user_key FROM deliveries h WHERE h.id = :b_id AND h.state = 'pending' "
    "AND h.locked_by IS NULL AND h.next_attempt_at_ms = :b_next) AND next_attempt_at_ms < :b_next")
# Postgres: one statement for the whole record, not one per retry (100 retries of an unordered
# destination cost 1.35 ms more per record that way, on a 4.4 ms record, against 0.4 ms). The
# heads are looked up by primary key, one by one: with the head's conditions beside the id, or
# without "OFFSET 0" (which keeps them out of the subquery), the planner read the heads from the
# partial index instead, all of it (a hash join, or a scan per head), cheap only while it is small.
_PG_HOLD_LATER = ("UPDATE deliveries SET next_attempt_at_ms = r.next_at "
                  "FROM unnest(%b::bigint[], %b::bigint[]) AS r(id, next_at), "
                  "LATERAL (SELECT d.id, d.destination, d.user_key, d.state, d.locked_by, d.next_attempt_at_ms "
                  "FROM deliveries d WHERE d.id = r.id OFFSET 0) AS h "
                  "WHERE h.user_key IS NOT NULL AND h.state = 'pending' AND h.locked_by IS NULL "
                  "AND h.next_attempt_at_ms = r.next_at AND deliveries.destination = h.destination "
                  "AND deliveries.user_key = h.user_key AND deliveries.state = 'pending' AND deliveries.id > h.id "
                  "AND deliveries.next_attempt_at_ms < r.next_at")


# locked_by is VARCHAR(64) (Postgres enforces it): an owner of up to 50 characters leaves room
# for ":" and a claim number of 13 digits.
OWNER_MAX_LENGTH = 50
# Claim numbers are unique in the process, so two queues given the same owner (tests, tools) still
# hand out distinct tokens; next() on a count is atomic under the GIL, so claim threads may share it.
_claim_numbers = itertools.count(1)


# How long claims may keep starting after a resume point before one starts from the front again.
RESUME_SECONDS = 5.0


@dataclass(frozen=True)
class _ResumePoint:
    after: tuple[int, int]  # (next_attempt_at_ms, id) of the last row claimed, in claim order
    since: float  # monotonic time of the last claim that started from the front


class ResumePoints:
    """Where a destination's next claim starts, while its claims keep coming back full.

    On Postgres a claimed row keeps its entry at the front of ``ix_deliveries_claim`` while its
    lease runs (a claim is a HOT update), and once its outcome is recorded that entry is dead
    until vacuum gets to it. A claim from the front steps over every such entry, so with a big
    backlog each claim cost more than the one before: a 1M-delivery claim-and-record loop fell
    from 7.2k rows/s over its first 100k to 4.8k on average. Starting after the last row
    claimed keeps each claim as cheap as the first.

    Rows can become due behind that point: a decoder committing late, a row another worker had
    locked and let go, a lease that ran out before its outcome was recorded. So a claim whose
    range runs short is topped up from the front, and once a point is ``RESUME_SECONDS`` old
    the next claim starts from the front; either way the front claim's last row is the new
    point. Shared by a worker's lanes (threads): a race can only put back a point another lane
    just replaced, which costs a rescan of a few rows or, at worst, a row waiting until the
    point is old.
    """

    def __init__(self, max_age: float = RESUME_SECONDS) -> None:
        self.max_age = max_age
        self._points: dict[str, _ResumePoint] = {}

    def start(self, destination: str) -> _ResumePoint | None:
        point = self._points.get(destination)
        if point is not None and time.monotonic() - point.since > self.max_age:
            return None
        return point

    def set(self, destination: str, point: _ResumePoint | None) -> None:
        if point is None:
            self._points.pop(destination, None)
        else:
            self._points[destination] = point


def _claim_order(row: Any) -> tuple[int, int]:
    """A claimed Postgres row's place in the claim order: (its due time before the claim, id)."""
    return row[5], row[0]


def lease_running(now: int) -> ColumnElement[bool]:
    """A delivery someone holds at ``now``: the complement of ``_NOT_LEASED``, for statements
    built with SQLAlchemy (status, replay). Written out with IS NOT NULL so that its negation
    is true, not NULL, for a row with no lease."""
    return and_(deliveries.c.locked_until_ms.is_not(None), deliveries.c.locked_until_ms > now)


def worker_id() -> str:
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# Not frozen: one is built per delivery claimed (see DecodedEvent). Nothing changes it but
# the parse kept in _event.
@dataclass(slots=True)
class Claimed:
    id: int
    attempts: int
    created_at_ms: int
    # The event as stored: the JSON the decoder wrote (orjson.dumps of the normalised event).
    payload: bytes
    received_at_ms: int
    lease: str  # the claim's token in locked_by: pass it to renew() and record()
    _event: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def event(self) -> dict[str, Any]:
        """The event parsed, on first use: an adapter that writes events out as JSON is handed
        :attr:`payload` instead (``Destination.takes_stored_json``), and never parses it. The
        parse, once per destination, was 12-25% of a SQLite worker's CPU in a three-way
        fan-out (bench/RESULTS.md, "R9: where the time goes")."""
        if self._event is None:
            # The stored payload keeps numbers no double holds as their digits.
            self._event = exactjson.loads(self.payload)
        return self._event


class DeliveryQueue:
    def __init__(self, store: Store, owner: str | None = None) -> None:
        self.store = store
        self.owner = owner or worker_id()
        self.resume_points = ResumePoints()
        if len(self.owner) > OWNER_MAX_LENGTH:
            raise ValueError(f"a delivery queue owner has at most {OWNER_MAX_LENGTH} characters "
                             f"(locked_by also holds the claim number): {self.owner!r}")

    def claim(self, destination: str, limit: int, lease_ms: int) -> list[Claimed]:
        if lease_ms < 1:  # a claim must not be due again at once (nor within its own transaction)
            raise ValueError(f"a lease lasts at least 1 ms, got {lease_ms}")
        now = now_ms()
        until = now + lease_ms
        lease = f"{self.owner}:{next(_claim_numbers)}"
        if self.store.backend == "postgresql":
            rows = self._claim_postgres(destination, limit, now, until, lease)
        else:
            with self.store.engine.begin() as conn:
                # SQLite: BEGIN IMMEDIATE already made this transaction the only writer.
                rows = conn.exec_driver_sql(_SQLITE_DUE, (destination, now, now, limit)).all()
                if rows:
                    conn.exec_driver_sql(_SQLITE_LEASE, (until, until, lease, now,
                                                         orjson.dumps([r[0] for r in rows])))
        # bytes from both drivers (a BLOB, a bytea); a Fragment of anything else would fail
        # only when written out, so any other buffer becomes bytes here.
        return [Claimed(r[0], r[1] + 1, r[2], r[3] if type(r[3]) is bytes else bytes(r[3]), r[4], lease)
                for r in rows]

    def _claim_postgres(self, destination: str, limit: int, now: int, until: int, lease: str) -> list[Any]:
        """One round trip (two when a resumed range runs short): lock the due rows nobody holds,
        lease them and return them with their events, oldest first; then move the resume point."""
        leased = (until, lease, now)
        start = self.resume_points.start(destination)
        with self.store.engine.begin() as conn:
            after: list[Any] = [] if start is None else conn.exec_driver_sql(
                _PG_CLAIM_AFTER, (destination, now, now, *start.after, limit, *leased)).all()
            # From the front: the whole claim, or the rest of one whose range ran out (rows
            # behind the point may be due). The rows leased just above are no longer due.
            wanted = limit - len(after)
            front = conn.exec_driver_sql(_PG_CLAIM_FROM_FRONT, (destination, now, now, wanted, *leased)).all() \
                if wanted else []
        # Only once the claim is committed. RETURNING has no order: _claim_order restores it.
        if start is not None and after and not wanted:
            self.resume_points.set(destination, _ResumePoint(_claim_order(max(after, key=_claim_order)),
                                                             start.since))
        elif front and len(front) == wanted:
            self.resume_points.set(destination, _ResumePoint(_claim_order(max(front, key=_claim_order)),
                                                             time.monotonic()))
        else:
            self.resume_points.set(destination, None)
        return sorted(after + front, key=_claim_order)

    def claim_plan(self, destination: str, limit: int = 100) -> Any:
        """How the database would run a claim from the front for ``destination`` now, leasing
        nothing: SQLite's EXPLAIN QUERY PLAN rows as ``(id, parent, detail)`` tuples, or
        Postgres's EXPLAIN (FORMAT JSON) plan. For the plan tests and bench/claims.py."""
        now = now_ms()
        with self.store.engine.connect() as conn:
            if self.store.backend == "postgresql":
                return conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + _PG_CLAIM_FROM_FRONT,
                                            (destination, now, now, limit, now, "plan", now)).scalar_one()
            return [(r[0], r[1], r[3]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + _SQLITE_DUE,
                                                               (destination, now, now, limit))]

    def hold_later_plan(self, retried: Sequence[tuple[int, int]]) -> Any:
        """The plan of record()'s "hold the later deliveries back" statement for these
        (delivery id, next attempt) retries, as :meth:`claim_plan` gives it; nothing changes."""
        with self.store.engine.connect() as conn:
            if self.store.backend == "postgresql":
                return conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + _PG_HOLD_LATER,
                                            tuple(list(column) for column in zip(*retried))).scalar_one()
            return [(r[0], r[1], r[3]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + _SQLITE_HOLD_LATER.text),
                                                             {"b_id": retried[0][0], "b_next": retried[0][1]})]

    def renew(self, lease: str, ids: Sequence[int], lease_ms: int) -> int:
        if not ids:
            return 0
        until = now_ms() + lease_ms
        # As the claim did: SQLite keeps a leased row's next attempt at its lease's end.
        moved = {} if self.store.backend == "postgresql" else {"next_attempt_at_ms": until}
        with self.store.engine.begin() as conn:
            result = conn.execute(update(deliveries).where(
                deliveries.c.id.in_(list(ids)), deliveries.c.locked_by == lease,
                deliveries.c.state == "pending").values(locked_until_ms=until, **moved))
            return result.rowcount

    def record(self, lease: str, decisions: Sequence[tuple[int, Decision]]) -> None:
        if not decisions:
            return
        now = now_ms()
        delivered = [i for i, d in decisions if d.state == DELIVERED]
        # Postgres text cannot hold NUL (a destination's error body may): one such error would
        # fail the whole batch's record, and every event of it would be delivered again.
        others = [{"b_id": i, "b_state": d.state, "b_next": d.next_attempt_at_ms or now,
                   "b_error": d.error.replace("\x00", "") if d.error else d.error,
                   "b_finished": now if d.state == DEAD else None}
                  for i, d in decisions if d.state != DELIVERED]
        held = and_(deliveries.c.locked_by == lease, deliveries.c.state == "pending")
        with self.store.engine.begin() as conn:
            if delivered:
                ids: Any = delivered if self.store.backend == "postgresql" else orjson.dumps(delivered)
                conn.exec_driver_sql(_PG_DELIVERED if self.store.backend == "postgresql" else _SQLITE_DELIVERED,
                                     (now, lease, ids))
            if others:
                conn.execute(update(deliveries).where(deliveries.c.id == bindparam("b_id"), held).values(
                    state=bindparam("b_state"), next_attempt_at_ms=bindparam("b_next"),
                    last_error=bindparam("b_error"), finished_at_ms=bindparam("b_finished"),
                    locked_until_ms=None, locked_by=None), others)
                retried = [(o["b_id"], o["b_next"]) for o in others if o["b_state"] != DEAD]
                if retried and self.store.backend == "postgresql":
                    conn.exec_driver_sql(_PG_HOLD_LATER, tuple(list(column) for column in zip(*retried)))
                elif retried:
                    conn.execute(_SQLITE_HOLD_LATER, [{"b_id": i, "b_next": at} for i, at in retried])

    def take_back_leases(self) -> int:
        with self.store.engine.begin() as conn:
            return conn.execute(update(deliveries).where(
                deliveries.c.state == "pending", deliveries.c.locked_until_ms.is_not(None)).values(
                next_attempt_at_ms=now_ms(), locked_until_ms=None, locked_by=None)).rowcount

    def release_expired(self) -> int:
        # Leased rows whose lease is no longer running (not NOT lease_running: that would
        # rewrite every pending row that holds no lease at all).
        with self.store.engine.begin() as conn:
            return conn.execute(update(deliveries).where(
                deliveries.c.state == "pending", deliveries.c.locked_until_ms <= now_ms()).values(
                locked_until_ms=None, locked_by=None)).rowcount
