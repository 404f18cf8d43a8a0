"""What an operator asks of the pipeline: status counts, replays, and orphaned deliveries."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, case, delete, func, select, update

from pipeline.config import Config
from pipeline.controllers import ControllerStatus, read_controllers
from pipeline.decoder import Decoder
from pipeline.messages import parse_timestamp
from pipeline.normalise import StoredRequest
from pipeline.queue import lease_running
from pipeline.schema import deliveries, events, outbox, rejected
from pipeline.store import Store, now_ms

log = logging.getLogger("trackrelay.replay")

HOUR_MS = 3_600_000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_moment(text: str, now: datetime | None = None) -> int:
    """An ISO-8601 time, or a duration back from now (``90m``, ``2h``, ``3d``), as epoch ms."""
    now = now or datetime.now(timezone.utc)
    match = _DURATION.match(text.strip())
    if match:
        moment = now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    else:
        try:
            moment = parse_timestamp(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is neither an ISO-8601 time nor a duration like 90m, 2h, 3d") from None
    return int(moment.timestamp() * 1000)


@dataclass
class DestinationStatus:
    pending: int = 0
    in_flight: int = 0
    retrying: int = 0
    dead: int = 0
    delivered_last_hour: int = 0
    oldest_pending_age_seconds: float | None = None
    # The workers' concurrency controllers for it (pipeline/controllers.py); None when no
    # running worker reported one (no worker, or a destination that is not HTTP).
    concurrency: ControllerStatus | None = None


@dataclass(frozen=True)
class Orphan:
    """A destination no longer configured whose deliveries are still waiting (or dead)."""
    name: str
    pending: int
    dead: int


@dataclass
class Status:
    destinations: dict[str, DestinationStatus] = field(default_factory=dict)
    outbox_pending: int = 0
    outbox_failed: int = 0
    rejected_total: int = 0
    rejected_last_hour: int = 0
    # Destinations listed above that are not configured: nothing delivers their pending rows.
    orphaned: list[str] = field(default_factory=list)


def status(store: Store, config: Config) -> Status:
    now = now_ms()
    result = Status(destinations={d.name: DestinationStatus() for d in config.destinations})
    leased = lease_running(now)
    query = (select(deliveries.c.destination,
                    func.sum(case((and_(deliveries.c.state == "pending", ~leased, deliveries.c.attempts == 0), 1),
                                  else_=0)),
                    func.sum(case((and_(deliveries.c.state == "pending", leased), 1), else_=0)),
                    func.sum(case((and_(deliveries.c.state == "pending", ~leased, deliveries.c.attempts > 0), 1),
                                  else_=0)),
                    func.sum(case((deliveries.c.state == "dead", 1), else_=0)),
                    func.min(case((deliveries.c.state == "pending", deliveries.c.created_at_ms), else_=None)))
             .where(deliveries.c.state.in_(["pending", "dead"]))
             .group_by(deliveries.c.destination))
    delivered = (select(deliveries.c.destination, func.count())
                 .where(deliveries.c.state == "delivered", deliveries.c.finished_at_ms >= now - HOUR_MS)
                 .group_by(deliveries.c.destination))
    with store.engine.connect().execution_options(readonly=True) as conn:
        for name, pending, in_flight, retrying, dead, oldest in conn.execute(query):
            entry = result.destinations.setdefault(name, DestinationStatus())
            entry.pending, entry.in_flight, entry.retrying = int(pending or 0), int(in_flight or 0), int(retrying or 0)
            entry.dead = int(dead or 0)
            entry.oldest_pending_age_seconds = (now - oldest) / 1000 if oldest is not None else None
        for name, count in conn.execute(delivered):
            result.destinations.setdefault(name, DestinationStatus()).delivered_last_hour = count
        for state, count in conn.execute(select(outbox.c.state, func.count())
                                         .where(outbox.c.state.in_(["pending", "failed"])).group_by(outbox.c.state)):
            setattr(result, f"outbox_{state}", count)
        for name, controller in read_controllers(conn, now).items():
            if name in result.destinations:
                result.destinations[name].concurrency = controller
        result.rejected_total, result.rejected_last_hour = conn.execute(select(
            func.count(), func.coalesce(func.sum(case((rejected.c.received_at_ms >= now - HOUR_MS, 1), else_=0)), 0)
        ).select_from(rejected)).one()
    configured = {d.name for d in config.destinations}
    result.orphaned = sorted(name for name, d in result.destinations.items()
                             if name not in configured and (d.pending or d.in_flight or d.retrying or d.dead))
    return result


def orphaned_destinations(store: Store, config: Config) -> list[Orphan]:
    """Destinations with pending or dead deliveries that ``config`` does not configure (removed
    from the file, or renamed): their deliveries wait, unsent, until the destination is
    configured again or they are discarded. By name."""
    configured = {d.name for d in config.destinations}
    query = (select(deliveries.c.destination,
                    func.sum(case((deliveries.c.state == "pending", 1), else_=0)),
                    func.sum(case((deliveries.c.state == "dead", 1), else_=0)))
             .where(deliveries.c.state.in_(["pending", "dead"]))
             .group_by(deliveries.c.destination).order_by(deliveries.c.destination))
    with store.engine.connect().execution_options(readonly=True) as conn:
        rows = conn.execute(query).all()
    return [Orphan(name, int(pending or 0), int(dead or 0)) for name, pending, dead in rows if name not in configured]


def discard_orphaned(store: Store, config: Config, destination: str, dry_run: bool = False, by: str = "cli") -> int:
    """Delete the pending and dead deliveries of ``destination``, which must not be configured
    (ValueError otherwise: a configured destination's backlog is replayed or delivered, never
    thrown away from here); return how many. A delivery some worker holds under a live lease
    (another worker that still has it configured) is left alone. Logged with who asked."""
    if destination in {d.name for d in config.destinations}:
        raise ValueError(f"destination {destination!r} is configured: only an orphaned destination's "
                         "deliveries can be discarded (remove it from the config and reload first)")
    conditions = [deliveries.c.destination == destination, deliveries.c.state.in_(["pending", "dead"]),
                  ~lease_running(now_ms())]
    with store.engine.begin() as conn:
        if dry_run:
            count = conn.execute(select(func.count()).select_from(deliveries).where(*conditions)).scalar_one()
        else:
            count = conn.execute(delete(deliveries).where(*conditions)).rowcount
    log.info("event=discard by=%s destination=%s dry_run=%s matched=%d", by, destination, dry_run, count)
    return count


def replay_deliveries(store: Store, destination: str | None, state: str | None = "dead", since_ms: int | None = None,
                      until_ms: int | None = None, message_type: str | None = None, dry_run: bool = False,
                      ids: Sequence[int] | None = None, by: str = "cli") -> int:
    """Put matching deliveries back to pending with fresh attempts; return how many. ``ids``
    narrows the match to those deliveries (the console's selection); ``state`` None means dead
    or pending. Every replay is logged with its filters (``by`` says who asked)."""
    now = now_ms()
    conditions = [deliveries.c.state.in_(["dead", "pending"]) if state is None else deliveries.c.state == state]
    if destination is not None:
        conditions.append(deliveries.c.destination == destination)
    if ids is not None:
        conditions.append(deliveries.c.id.in_(list(ids)))
    if state in ("pending", None):
        # Never reset a delivery a worker holds: its result would be lost and the event sent twice.
        conditions.append(~lease_running(now))
    event_conditions = []
    if since_ms is not None:
        event_conditions.append(events.c.received_at_ms >= since_ms)
    if until_ms is not None:
        event_conditions.append(events.c.received_at_ms < until_ms)
    if message_type is not None:
        event_conditions.append(events.c.type == message_type)
    if event_conditions:
        conditions.append(deliveries.c.event_id.in_(select(events.c.id).where(*event_conditions)))
    with store.engine.begin() as conn:
        if dry_run:
            count = conn.execute(select(func.count()).select_from(deliveries).where(*conditions)).scalar_one()
        else:
            count = conn.execute(update(deliveries).where(*conditions).values(
                state="pending", attempts=0, created_at_ms=now, next_attempt_at_ms=now, locked_until_ms=None,
                locked_by=None, finished_at_ms=None)).rowcount
    # The command prints its own line; the console's replays are logged for the operators.
    log.log(logging.DEBUG if by == "cli" else logging.INFO, "event=replay by=%s destination=%s state=%s since=%s until=%s type=%s ids=%s dry_run=%s matched=%d",
             by, destination or "*", state or "dead|pending", since_ms, until_ms, message_type or "*",
             len(ids) if ids is not None else "-", dry_run, count)
    return count


def replay_outbox(store: Store, config: Config, destination: str, since_ms: int, until_ms: int | None = None,
                  message_type: str | None = None, dry_run: bool = False, rows_per_transaction: int = 100) -> int:
    """Decode stored raw requests again and deliver their events to ``destination`` (a
    backfill); deduplication does not stop it. Returns the number of deliveries planned.

    Only rows the worker has already decoded (``done``) are replayed: a pending row is the
    worker's to decode for every destination, and replaying it first would make its events
    look like duplicates to that decode."""
    decoder = Decoder(store, config)
    planned, after_id = 0, 0
    while True:
        query = (select(outbox.c.id, outbox.c.received_at_ms, outbox.c.route, outbox.c.body, outbox.c.remote_addr,
                        outbox.c.auth_key, outbox.c.override_key, outbox.c.user_agent)
                 .where(outbox.c.id > after_id, outbox.c.state == "done", outbox.c.received_at_ms >= since_ms)
                 .order_by(outbox.c.id).limit(rows_per_transaction))
        if until_ms is not None:
            query = query.where(outbox.c.received_at_ms < until_ms)
        with store.engine.connect().execution_options(readonly=True) as conn:
            requests = [StoredRequest(**row._mapping) for row in conn.execute(query)]
        if not requests:
            return planned
        after_id = requests[-1].id
        if dry_run:
            planned += sum(1 for r in requests for e in decoder.expand(r).events
                           if (message_type is None or e.type == message_type)
                           and destination in decoder.router.destinations_for(e.source, e.payload))
        else:
            planned += decoder.replay_requests(requests, destination, message_type).deliveries
