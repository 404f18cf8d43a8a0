"""Decoding the outbox: raw requests become deduplicated events and their deliveries.

One transaction per group of rows: claim pending outbox rows (``FOR UPDATE SKIP LOCKED`` on
Postgres, so several workers share the work; SQLite's ``BEGIN IMMEDIATE`` serialises), insert
their events (a (source, messageId) already stored is a duplicate and is skipped), insert one
delivery per routed destination, record refused messages, and mark the rows done. Either all
of that commits or none of it does, so a crash never loses or doubles a row's events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from sqlalchemy import Connection, select, tuple_, update
from sqlalchemy.exc import DBAPIError

from pipeline.config import Config
from pipeline.metrics import count_refused_items, count_refused_request
from pipeline.normalise import DecodedEvent, Expansion, StoredRequest, expand
from pipeline.routing import Router
from pipeline.schema import events, outbox, rejected
from pipeline.sources import SourceRegistry
from pipeline.store import Store, is_unavailable, now_ms, short_error

log = logging.getLogger("trackrelay.decoder")

_EVENT_COLUMNS = "source, message_id, type, event_name, user_id, outbox_id, received_at_ms, payload"
_SQLITE_INSERT_EVENTS = (f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT (source, message_id) DO NOTHING")
# One statement per group whatever its size: the columns as arrays, sent in binary (%b):
# psycopg writes a text-format bytea[] in Python, hex-escaping and quoting every payload,
# about 8x the time (500 payloads of ~400 bytes: 5.7 ms against 0.7).
_PG_INSERT_EVENTS = (f"INSERT INTO events ({_EVENT_COLUMNS}) "
                     "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], "
                     "%b::bigint[], %b::bytea[]) "
                     "ON CONFLICT (source, message_id) DO NOTHING RETURNING id, source, message_id")
_DELIVERY_COLUMNS = "event_id, destination, state, attempts, created_at_ms, next_attempt_at_ms"
_SQLITE_INSERT_DELIVERIES = f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES (?, ?, 'pending', 0, ?, ?)"
_PG_INSERT_DELIVERIES = (f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) "
                         "SELECT e, d, 'pending', 0, %s, %s FROM unnest(%b::bigint[], %b::text[]) AS t(e, d)")
# A group with deliveries to an ordered destination (ordering = "user") also stores their
# user_key; the others keep the statement above, so destinations without ordering pay nothing.
_SQLITE_INSERT_ORDERED = (f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}, user_key) "
                          "VALUES (?, ?, 'pending', 0, ?, ?, ?)")
# Their ids are the order (ids in the order of the arrays, hence the ORDER BY).
_PG_INSERT_ORDERED = (f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}, user_key) "
                      "SELECT e, d, 'pending', 0, %s, %s, u FROM unnest(%b::bigint[], %b::text[], %b::text[]) "
                      "WITH ORDINALITY AS t(e, d, u, n) ORDER BY n")
# Per-user ordering delivers one user's events in delivery id order, so the outbox must be
# decoded in its own order: with several Postgres workers decoding side by side, the group of
# later rows could take its ids (or commit) first, and its events would go out before the
# earlier group's (seen in tests/test_ordering.py). With an ordered destination configured,
# decode transactions take turns on this lock (any constant key: "trackrelay decode").
_PG_DECODE_IN_TURN = "SELECT pg_advisory_xact_lock(7402684730285466911)"


@dataclass(frozen=True)
class DecodeResult:
    rows: int
    events: int
    duplicates: int
    deliveries: int
    refused: int
    # The highest outbox id decoded: where a row-by-row pass goes on from. Not a figure.
    last_id: int = field(default=0, compare=False)
    # Pending rows may remain: the call stopped at its row limit or its events budget.
    more: bool = field(default=False, compare=False)


class Decoder:
    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config
        self.sources = SourceRegistry(config.sources)
        self.router = Router(config.destinations, config.sources)
        self.ordered = frozenset(d.name for d in config.destinations if d.ordering == "user")
        # Rows to read for the next group: about decode_batch_events worth, learnt from the
        # events per row of the group before, so bodies beyond the budget are not read.
        self._rows_hint: int | None = None

    def expand(self, request: StoredRequest) -> Expansion:
        return expand(request, self.sources, max_message_bytes=self.config.receiver.max_message_bytes,
                      add_context_ip=self.config.worker.add_context_ip)

    def decode_pending(self, limit: int | None = None) -> DecodeResult:
        """Decode up to ``limit`` pending outbox rows (blocking).

        A group that fails for any reason but an outage (a value the database cannot hold, or
        a bug of ours that one row trips) is decoded again row by row, and a row that still
        fails is set aside as ``failed`` with a ``rejected`` record, so one bad row never stops
        the pipeline behind it.
        """
        limit = limit or self.config.worker.decode_batch_rows
        try:
            return self._decode(limit, after_id=None)
        except Exception as exc:  # a bug of ours on one row must not stop the rows behind it either
            if is_unavailable(exc):
                raise
            log.warning("event=decode_group_failed rows<=%d error=%r action=row_by_row", limit, _described(exc))
        totals = DecodeResult(0, 0, 0, 0, 0)
        after_id = 0
        for _ in range(limit):
            try:
                result = self._decode(1, after_id=after_id)
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                after_id = self._set_aside_next(after_id, exc)
                totals = _add(totals, DecodeResult(1, 0, 0, 0, 1))
                continue
            if result.rows == 0:
                return totals
            after_id = result.last_id
            totals = _add(totals, result)
        return replace(totals, more=True)

    def _decode(self, limit: int, after_id: int | None) -> DecodeResult:
        if self._rows_hint is not None:
            limit = min(limit, self._rows_hint)
        query = (select(outbox.c.id, outbox.c.received_at_ms, outbox.c.route, outbox.c.body,
                        outbox.c.remote_addr, outbox.c.auth_key, outbox.c.override_key, outbox.c.user_agent)
                 .where(outbox.c.state == "pending").order_by(outbox.c.id).limit(limit))
        if after_id is not None:
            query = query.where(outbox.c.id > after_id)
        if self.store.backend == "sqlite":
            # One worker per SQLite database (it holds a lock file), so nobody else decodes
            # these rows: read and expand them outside the write transaction, which then only
            # inserts, keeping the receiver's wait for the write lock short.
            with self.store.engine.connect().execution_options(readonly=True) as conn:
                requests = [StoredRequest(**row._mapping) for row in conn.execute(query)]
            if not requests:
                return DecodeResult(0, 0, 0, 0, 0)
            expanded, more = self._expand_within_budget(requests, limit)
            del requests
            with self.store.engine.begin() as conn:
                result = self._store_expansions(conn, expanded, only_destination=None)
                self._mark(conn, [r for r, _ in expanded], "done")
            count_refused_items(item.problem.code for _, x in expanded for item in x.refused)
            return replace(result, more=more)
        with self.store.engine.begin() as conn:
            if self.ordered:
                conn.exec_driver_sql(_PG_DECODE_IN_TURN)
            # Several workers may share a Postgres database: each takes rows nobody holds.
            requests = [StoredRequest(**row._mapping)
                        for row in conn.execute(query.with_for_update(skip_locked=True))]
            if not requests:
                return DecodeResult(0, 0, 0, 0, 0)
            # Rows beyond the events budget stay pending (their lock ends with the commit).
            expanded, more = self._expand_within_budget(requests, limit)
            del requests
            result = self._store_expansions(conn, expanded, only_destination=None)
            self._mark(conn, [r for r, _ in expanded], "done")
        count_refused_items(item.problem.code for _, x in expanded for item in x.refused)  # once committed
        return replace(result, more=more)

    def _expand_within_budget(self, requests: list[StoredRequest], limit: int
                              ) -> tuple[list[tuple[StoredRequest, Expansion]], bool]:
        """Expand rows in order until decode_batch_events events (and refusals) are reached, so
        a group of big batches does not hold tens of thousands of events in memory at once.
        Returns the expanded rows and whether pending rows may remain."""
        budget = self.config.worker.decode_batch_events
        expanded, count = [], 0
        for request in requests:
            expansion = self.expand(request)
            expanded.append((request, expansion))
            count += len(expansion.events) + len(expansion.refused)
            if count >= budget:
                break
        per_row = max(1, count // len(expanded))
        self._rows_hint = max(1, -(-budget // per_row))  # rounded up
        return expanded, len(expanded) < len(requests) or len(requests) >= limit

    def _set_aside_next(self, after_id: int, exc: BaseException) -> int:
        """Mark the next pending row after ``after_id`` failed, with a rejected record; return its id."""
        with self.store.engine.begin() as conn:
            row = conn.execute(select(outbox.c.id, outbox.c.received_at_ms, outbox.c.route, outbox.c.body,
                                      outbox.c.remote_addr)
                               .where(outbox.c.state == "pending", outbox.c.id > after_id)
                               .order_by(outbox.c.id).limit(1).with_for_update(skip_locked=True)).first()
            if row is None:
                return after_id
            conn.execute(update(outbox).where(outbox.c.id == row.id).values(state="failed"))
            conn.execute(rejected.insert().values(
                received_at_ms=row.received_at_ms, route=row.route, source=None, status=500, code="decode_failed",
                reason=f"outbox row {row.id} could not be stored: {_described(exc)}"[:2000],
                raw=row.body[: self.config.receiver.rejected_raw_bytes], remote_addr=row.remote_addr))
        count_refused_request("decode_failed")
        log.error("event=decode_row_failed outbox_id=%d error=%r", row.id, _described(exc))
        return row.id

    @staticmethod
    def _mark(conn: Connection, requests: Sequence[StoredRequest], state: str) -> None:
        conn.execute(update(outbox).where(outbox.c.id.in_([r.id for r in requests])).values(state=state))

    def replay_requests(self, requests: Sequence[StoredRequest], destination: str,
                        message_type: str | None = None) -> DecodeResult:
        """Deliver these stored requests (or their events of ``message_type``) to ``destination``
        again, duplicates included."""
        expanded = [(r, self.expand(r)) for r in requests]
        if message_type is not None:
            expanded = [(r, Expansion([e for e in x.events if e.type == message_type], x.refused))
                        for r, x in expanded]
        with self.store.engine.begin() as conn:
            return self._store_expansions(conn, expanded, only_destination=destination)

    def _store_expansions(self, conn: Connection, expanded: Sequence[tuple[StoredRequest, Expansion]],
                          only_destination: str | None) -> DecodeResult:
        now = now_ms()
        decoded: list[tuple[StoredRequest, DecodedEvent]] = []
        refused_rows: list[dict[str, Any]] = []
        for request, expansion in expanded:
            decoded += [(request, event) for event in expansion.events]
            if only_destination is None:
                refused_rows += [self._refused_row(request, item) for item in expansion.refused]
        ids = self._insert_events(conn, decoded)
        if only_destination is not None:
            # An explicit replay is not stopped by deduplication: find the stored event.
            ids.update(self._existing_ids(conn, [e for _, e in decoded if (e.source, e.message_id) not in ids]))
        planned = []
        seen: set[int] = set()
        for _, event in decoded:
            event_id = ids.get((event.source, event.message_id))
            if event_id is None or event_id in seen:
                continue  # a duplicate (resent message, or twice in one batch)
            seen.add(event_id)
            for name in self.router.destinations_for(event.source, event.payload):
                if only_destination is None or name == only_destination:
                    planned.append((event_id, name, user_key(event.payload) if name in self.ordered else None))
        if planned:
            self._insert_deliveries(conn, planned, now)
        if refused_rows:
            conn.execute(rejected.insert(), refused_rows)
        return DecodeResult(len(expanded), len(seen), len(decoded) - len(seen), len(planned), len(refused_rows),
                            last_id=max((r.id for r, _ in expanded), default=0))

    def _insert_events(self, conn: Connection, decoded: list[tuple[StoredRequest, DecodedEvent]]
                       ) -> dict[tuple[str, str], int]:
        """Insert the events; the ids of those stored now, by (source, message_id). A duplicate
        (stored before, or twice in this group) gets no id.

        Fixed statement texts through the driver: SQLAlchemy's multi-row VALUES would be new
        SQL for every group, which the driver then converts again."""
        if not decoded:
            return {}
        # Postgres text cannot hold NUL: one such event name would fail every decode of its row.
        rows = [(e.source, e.message_id, e.type, e.event_name.replace("\x00", "") if e.event_name else e.event_name,
                 user_key(e.payload), r.id, r.received_at_ms, e.payload_json or orjson.dumps(e.payload))
                for r, e in decoded]
        if self.store.backend == "postgresql":
            columns = tuple(list(column) for column in zip(*rows))
            return {(source, message_id): event_id
                    for event_id, source, message_id in conn.exec_driver_sql(_PG_INSERT_EVENTS, columns)}
        # SQLite: this transaction holds the write lock (BEGIN IMMEDIATE), so the rows with an
        # id above the largest before the insert are exactly the ones it inserted.
        before = conn.exec_driver_sql("SELECT coalesce(max(id), 0) FROM events").scalar_one()
        conn.exec_driver_sql(_SQLITE_INSERT_EVENTS, rows)
        return {(source, message_id): event_id for event_id, source, message_id in conn.exec_driver_sql(
            "SELECT id, source, message_id FROM events WHERE id > ?", (before,))}

    def _insert_deliveries(self, conn: Connection, planned: list[tuple[int, str, str | None]], now: int) -> None:
        """``planned``: (event id, destination, user key or None) for each delivery."""
        ordered = any(key is not None for _, _, key in planned)
        if self.store.backend == "postgresql":
            event_ids, names, keys = zip(*planned)
            if ordered:
                conn.exec_driver_sql(_PG_INSERT_ORDERED, (now, now, list(event_ids), list(names), list(keys)))
            else:
                conn.exec_driver_sql(_PG_INSERT_DELIVERIES, (now, now, list(event_ids), list(names)))
        elif ordered:
            conn.exec_driver_sql(_SQLITE_INSERT_ORDERED, [(e, name, now, now, key) for e, name, key in planned])
        else:
            conn.exec_driver_sql(_SQLITE_INSERT_DELIVERIES, [(e, name, now, now) for e, name, _ in planned])

    def _existing_ids(self, conn: Connection, wanted: Iterable[DecodedEvent]) -> dict[tuple[str, str], int]:
        keys = list({(e.source, e.message_id) for e in wanted})
        found: dict[tuple[str, str], int] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            query = select(events.c.id, events.c.source, events.c.message_id).where(
                tuple_(events.c.source, events.c.message_id).in_(chunk))
            found.update({(row.source, row.message_id): row.id for row in conn.execute(query)})
        return found

    def _refused_row(self, request: StoredRequest, item: Any) -> dict[str, Any]:
        problem = item.problem
        reason = f"{problem.message}: {problem.details}" if problem.details else problem.message
        if item.index is not None:
            reason = f"batch item {item.index}: {reason}"
        return {"received_at_ms": request.received_at_ms, "route": request.route, "source": None,
                "status": problem.status, "code": problem.code, "reason": reason,
                "raw": item.raw[: self.config.receiver.rejected_raw_bytes] if item.raw is not None else None,
                "remote_addr": request.remote_addr}


def user_key(payload: dict[str, Any]) -> str | None:
    """Whose event this is, for events.user_id: the userId, else the anonymousId (the same
    "absent" as validation: None and ""), as text; a numeric id as its JSON digits."""
    value = payload.get("userId")
    if value is None or value == "":
        value = payload.get("anonymousId")
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text.replace("\x00", "")  # Postgres text cannot hold NUL


def _add(a: DecodeResult, b: DecodeResult) -> DecodeResult:
    return DecodeResult(a.rows + b.rows, a.events + b.events, a.duplicates + b.duplicates,
                        a.deliveries + b.deliveries, a.refused + b.refused, max(a.last_id, b.last_id))


def _described(exc: BaseException) -> str:
    """A database error's own message; anything else (a bug of ours) with its type too: a
    KeyError's message is only the key."""
    return short_error(exc) if isinstance(exc, DBAPIError) else f"{type(exc).__name__}: {short_error(exc)}"
