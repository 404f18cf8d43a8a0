"""What the console reads from the store: the overview, throughput per minute, deliveries,
one event with its history, and refused requests. Blocking calls: handlers run them on a thread.

Lists are newest first and paged by key (``cursor`` is the last id of the page before, the next
page is the ids below it), never by OFFSET: a page costs the same however deep it is, and rows
arriving meanwhile (higher ids) do not shift the pages a reader is walking through.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from sqlalchemy import and_, func, select

from pipeline.config import Config
from pipeline.normalise import iso_ms
from pipeline.operations import status
from pipeline.queue import lease_running
from pipeline.schema import deliveries, events, outbox, rejected
from pipeline.store import Store, now_ms

MINUTE_MS = 60_000
# A delivery as the console names its state: "pending" splits into waiting for its first
# attempt, held by a worker now, and waiting for a retry.
DELIVERY_STATES = ("pending", "in_flight", "retrying", "dead", "delivered")
MAX_LIMIT = 500
RAW_PREVIEW_BYTES = 512
# A write key inside a stored body: a JSON field ("writeKey": "...", in any spelling of the
# name) or a query field (writeKey=...). A value cut short (rejected.raw keeps the start of the
# input) is masked up to the end.
_KEY_IN_BODY = re.compile(rb'("write_?key"\s*:\s*)"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.IGNORECASE)
_KEY_IN_QUERY = re.compile(rb'((?:^|[?&;])write_?key=)[^&;\s]*', re.IGNORECASE)
MASKED = "<masked>"


def iso(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(datetime.fromtimestamp(ms / 1000, timezone.utc))


def mask_keys(body: bytes) -> bytes:
    """``body`` with the value of every writeKey field replaced by ``"<masked>"``."""
    masked = _KEY_IN_BODY.sub(rb'\1"' + MASKED.encode() + rb'"', body)
    return _KEY_IN_QUERY.sub(rb"\1" + MASKED.encode(), masked)


def as_text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


# -- overview -----------------------------------------------------------------------------

def overview(store: Store, config: Config) -> dict[str, Any]:
    """``trackrelay status`` (pipeline.operations.status: the same figures), with each
    destination's last error and whether it is still configured."""
    result = dataclasses.asdict(status(store, config))
    configured = {d.name for d in config.destinations}
    with store.engine.connect().execution_options(readonly=True) as conn:
        for name, entry in result["destinations"].items():
            entry["configured"] = name in configured
            entry["last_error"], entry["last_error_at"] = _last_error(conn, name)
    result["generated_at"] = iso(now_ms())
    return result


def _last_error(conn: Any, destination: str) -> tuple[str | None, str | None]:
    """The error of the latest failed attempt among the deliveries still waiting or dead (both
    lookups are ranges of the claim index: destination, state, next attempt)."""
    found: list[tuple[int, str]] = []
    for state in ("pending", "dead"):
        row = conn.execute(select(deliveries.c.last_error, deliveries.c.last_attempt_at_ms)
                           .where(deliveries.c.destination == destination, deliveries.c.state == state,
                                  deliveries.c.last_error.is_not(None))
                           .order_by(deliveries.c.next_attempt_at_ms.desc()).limit(1)).first()
        if row is not None:
            found.append((row.last_attempt_at_ms or 0, row.last_error))
    if not found:
        return None, None
    at, error = max(found)
    return error, iso(at)


# -- throughput -----------------------------------------------------------------------------

def throughput(store: Store, minutes: int, now: int | None = None) -> list[dict[str, Any]]:
    """Per minute over the last ``minutes``: events accepted (stored after deduplication, by
    the minute received), deliveries delivered and dead (by the minute they finished), and
    retried: deliveries waiting for a retry, by the minute of their failed attempt (a row
    shows its latest attempt only, so a delivery retried twice counts once)."""
    now = now_ms() if now is None else now
    start = (now // MINUTE_MS - minutes + 1) * MINUTE_MS
    buckets = {start + i * MINUTE_MS: {"accepted": 0, "delivered": 0, "retried": 0, "dead": 0}
               for i in range(minutes)}

    def per_minute(column: Any, *where: Any) -> Any:
        minute = column - column % MINUTE_MS
        return select(minute, func.count()).where(column >= start, *where).group_by(minute)

    queries = {
        "accepted": per_minute(events.c.received_at_ms),
        "delivered": per_minute(deliveries.c.finished_at_ms, deliveries.c.state == "delivered"),
        "dead": per_minute(deliveries.c.finished_at_ms, deliveries.c.state == "dead"),
        "retried": per_minute(deliveries.c.last_attempt_at_ms, deliveries.c.state == "pending",
                              deliveries.c.attempts > 0, deliveries.c.last_error.is_not(None)),
    }
    with store.engine.connect().execution_options(readonly=True) as conn:
        for name, query in queries.items():
            for minute, count in conn.execute(query):
                if int(minute) in buckets:
                    buckets[int(minute)][name] = int(count)
    return [{"minute": iso(minute), "minute_ms": minute, **counts} for minute, counts in buckets.items()]


# -- deliveries -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DeliveryFilter:
    destination: str | None = None
    state: str | None = None
    # On the event's receipt time, as `trackrelay replay` filters.
    since_ms: int | None = None
    until_ms: int | None = None
    type: str | None = None
    event: str | None = None
    user_id: str | None = None


def _state_condition(state: str, now: int) -> Any:
    leased = lease_running(now)
    pending = deliveries.c.state == "pending"
    return {
        "pending": and_(pending, ~leased, deliveries.c.attempts == 0),
        "in_flight": and_(pending, leased),
        "retrying": and_(pending, ~leased, deliveries.c.attempts > 0),
        "dead": deliveries.c.state == "dead",
        "delivered": deliveries.c.state == "delivered",
    }[state]


def _shown_state(row: Any, now: int) -> str:
    if row.state != "pending":
        return row.state
    if row.locked_until_ms is not None and row.locked_until_ms > now:
        return "in_flight"
    return "retrying" if row.attempts > 0 else "pending"


def filter_conditions(f: DeliveryFilter, now: int) -> list[Any]:
    conditions: list[Any] = []
    if f.destination is not None:
        conditions.append(deliveries.c.destination == f.destination)
    if f.state is not None:
        conditions.append(_state_condition(f.state, now))
    if f.since_ms is not None:
        conditions.append(events.c.received_at_ms >= f.since_ms)
    if f.until_ms is not None:
        conditions.append(events.c.received_at_ms < f.until_ms)
    if f.type is not None:
        conditions.append(events.c.type == f.type)
    if f.event is not None:
        conditions.append(events.c.event_name == f.event)
    if f.user_id is not None:
        conditions.append(events.c.user_id == f.user_id)
    return conditions


_DELIVERY_COLUMNS = (deliveries.c.id, deliveries.c.destination, deliveries.c.state, deliveries.c.attempts,
                     deliveries.c.created_at_ms, deliveries.c.next_attempt_at_ms, deliveries.c.locked_until_ms,
                     deliveries.c.last_attempt_at_ms, deliveries.c.finished_at_ms, deliveries.c.last_error)


def _delivery(row: Any, now: int) -> dict[str, Any]:
    return {"id": row.id, "destination": row.destination, "state": _shown_state(row, now),
            "attempts": row.attempts, "created_at": iso(row.created_at_ms),
            "next_attempt_at": iso(row.next_attempt_at_ms) if row.state == "pending" else None,
            "last_attempt_at": iso(row.last_attempt_at_ms), "finished_at": iso(row.finished_at_ms),
            "last_error": row.last_error}


def deliveries_page(store: Store, f: DeliveryFilter, limit: int, cursor: int | None) -> dict[str, Any]:
    """Deliveries matching ``f``, newest first, each with its event's type, name, messageId
    and user; ``next_cursor`` pages on (None on the last page)."""
    now = now_ms()
    conditions = filter_conditions(f, now)
    if cursor is not None:
        conditions.append(deliveries.c.id < cursor)
    query = (select(*_DELIVERY_COLUMNS, events.c.source, events.c.message_id, events.c.type, events.c.event_name,
                    events.c.user_id, events.c.received_at_ms)
             .join(events, events.c.id == deliveries.c.event_id)
             .where(*conditions).order_by(deliveries.c.id.desc()).limit(limit + 1))
    with store.engine.connect().execution_options(readonly=True) as conn:
        rows = conn.execute(query).all()
    items = [{**_delivery(row, now), "source": row.source, "message_id": row.message_id, "type": row.type,
              "event": row.event_name, "user_id": row.user_id, "received_at": iso(row.received_at_ms)}
             for row in rows[:limit]]
    return {"items": items, "next_cursor": str(rows[limit - 1].id) if len(rows) > limit else None}


def matching_delivery_ids(store: Store, f: DeliveryFilter, cap: int) -> list[int]:
    """The ids of the deliveries ``f`` matches (at most ``cap``), for a replay by filter."""
    now = now_ms()
    query = (select(deliveries.c.id).join(events, events.c.id == deliveries.c.event_id)
             .where(*filter_conditions(f, now)).order_by(deliveries.c.id).limit(cap))
    with store.engine.connect().execution_options(readonly=True) as conn:
        return [row.id for row in conn.execute(query)]


# -- one event ------------------------------------------------------------------------------

def event_detail(store: Store, config: Config, message_id: str, source: str | None,
                 payload_as: Callable[[bytes], Any] = orjson.Fragment) -> dict[str, Any] | None:
    """The stored event of ``message_id`` (in ``source``, else in any configured source), its
    raw request as received with write keys masked, and its deliveries; None if not found.
    The payload is ``payload_as(its stored bytes)``: by default a Fragment, which JSON
    answers embed as those very bytes (numbers keep their digits)."""
    sources = [source] if source is not None else [s.name for s in config.sources] or ["default"]
    now = now_ms()
    with store.engine.connect().execution_options(readonly=True) as conn:
        # (source, message_id) is the unique index: an IN list of sources uses it.
        row = conn.execute(select(events).where(events.c.source.in_(sources), events.c.message_id == message_id)
                           .order_by(events.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        request = None
        if row.outbox_id is not None:
            request = conn.execute(select(outbox).where(outbox.c.id == row.outbox_id)).first()
        history = conn.execute(select(*_DELIVERY_COLUMNS).where(deliveries.c.event_id == row.id)
                               .order_by(deliveries.c.destination)).all()
    return {
        "event": {"id": row.id, "source": row.source, "message_id": row.message_id, "type": row.type,
                  "event": row.event_name, "user_id": row.user_id, "received_at": iso(row.received_at_ms),
                  "payload": payload_as(row.payload)},
        "request": None if request is None else {
            "id": request.id, "route": request.route, "received_at": iso(request.received_at_ms),
            "remote_addr": request.remote_addr, "user_agent": request.user_agent,
            "auth_key": MASKED if request.auth_key else None,
            "override_key": MASKED if request.override_key else None,
            "body": as_text(mask_keys(request.body)), "state": request.state},
        "deliveries": [_delivery(d, now) for d in history],
    }


# -- refused requests -----------------------------------------------------------------------

@dataclass(frozen=True)
class RejectedFilter:
    since_ms: int | None = None
    # A refusal's code ("invalid_json", "request_timeout"...), as in trackrelay_rejected_total.
    reason: str | None = None
    route: str | None = None


def rejected_page(store: Store, f: RejectedFilter, limit: int, cursor: int | None) -> dict[str, Any]:
    conditions: list[Any] = []
    if f.since_ms is not None:
        conditions.append(rejected.c.received_at_ms >= f.since_ms)
    if f.reason is not None:
        conditions.append(rejected.c.code == f.reason)
    if f.route is not None:
        conditions.append(rejected.c.route == f.route)
    if cursor is not None:
        conditions.append(rejected.c.id < cursor)
    query = (select(rejected.c.id, rejected.c.received_at_ms, rejected.c.route, rejected.c.source,
                    rejected.c.status, rejected.c.code, rejected.c.reason, rejected.c.remote_addr,
                    func.substr(rejected.c.raw, 1, RAW_PREVIEW_BYTES).label("raw"),
                    func.length(rejected.c.raw).label("raw_bytes"))
             .where(*conditions).order_by(rejected.c.id.desc()).limit(limit + 1))
    with store.engine.connect().execution_options(readonly=True) as conn:
        rows = conn.execute(query).all()
    items = [{"id": r.id, "received_at": iso(r.received_at_ms), "route": r.route, "source": r.source,
              "status": r.status, "reason": r.code, "message": r.reason, "remote_addr": r.remote_addr,
              "raw_start": as_text(mask_keys(bytes(r.raw))) if r.raw is not None else None,
              "raw_bytes": r.raw_bytes} for r in rows[:limit]]
    return {"items": items, "next_cursor": str(rows[limit - 1].id) if len(rows) > limit else None}


def rejected_reasons(store: Store) -> list[str]:
    """The refusal codes stored, for the failures page's filter."""
    with store.engine.connect().execution_options(readonly=True) as conn:
        return sorted(code for (code,) in conn.execute(select(rejected.c.code).distinct()))
