"""``GET /api/live``: a Server-Sent Events stream of events as they are accepted and of each
delivery as it is delivered, retried or goes dead: the console's live debugger.

Events are accepted in any receiver process and delivered by the worker (maybe on another
machine), so the feed reads the store, not the processes: while anyone watches, one poll every
half second (on a thread, on the console's own pool) reads the events stored since the last
(with their deliveries: the worker writes both in one transaction) and the deliveries of the
last ``TRACKED_EVENTS`` events shown, and sends what changed. Nobody watching: no queries.

What it shows is sampled once a poll: a delivery retried and failed again within one poll shows
its latest state (its attempts count says how many went before).

Bounds: a poll takes at most ``EVENTS_PER_POLL`` new events; when more arrived it skips to the
newest and says how many were not shown (a debugger shows a sample under load, it does not fall
behind). Each reader has a queue of ``QUEUE_MESSAGES``; a reader whose queue is full, or whose
socket has not taken a message for ``STALL_SECONDS``, is dropped. Ingest never waits for any of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import func, select
from tornado.iostream import StreamClosedError

from pipeline.messages import MESSAGE_TYPES
from pipeline.schema import deliveries, events
from pipeline.store import Store, now_ms
from receiver.admin.api import ApiHandler
from receiver.admin.queries import iso

log = logging.getLogger("trackrelay.console")

POLL_SECONDS = 0.5
EVENTS_PER_POLL = 200
TRACKED_EVENTS = 2000
QUEUE_MESSAGES = 1000
STALL_SECONDS = 10.0
HEARTBEAT_SECONDS = 15.0
# What the stream reports of a delivery: the states a debugger follows.
REPORTED = ("delivered", "retrying", "dead")


@dataclass(eq=False)  # readers are told apart by identity (a set of them)
class Reader:
    source: str | None = None
    type: str | None = None
    destination: str | None = None
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MESSAGES))
    dropped: bool = False

    def wants(self, message: dict[str, Any]) -> bool:
        if self.source is not None and message["source"] != self.source:
            return False
        if self.type is not None and message["type"] != self.type:
            return False
        if self.destination is not None:
            names = message.get("destinations", [message.get("destination")])
            return self.destination in names
        return True


def _sse(kind: str, message: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(message) + b"\n\n"


class LiveFeed:
    def __init__(self, store: Store, poll_seconds: float = POLL_SECONDS) -> None:
        self.store, self.poll_seconds = store, poll_seconds
        self.readers: set[Reader] = set()
        self._task: asyncio.Task[None] | None = None
        self._after_id: int | None = None
        # event id -> (its message, {delivery id: last state reported or seen})
        self._tracked: OrderedDict[int, tuple[dict[str, Any], dict[int, tuple[str, int]]]] = OrderedDict()

    def join(self, reader: Reader) -> None:
        self.readers.add(reader)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def leave(self, reader: Reader) -> None:
        self.readers.discard(reader)

    async def close(self) -> None:
        for reader in list(self.readers):
            self._drop(reader)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        try:
            while self.readers:
                try:
                    messages = await asyncio.to_thread(self.poll)
                except Exception as exc:  # an outage: say so, keep polling
                    log.warning("event=live_poll_failed error=%r", str(exc)[:200])
                    messages = []
                for kind, message in messages:
                    self.publish(kind, message)
                await asyncio.sleep(self.poll_seconds)
        finally:
            self._after_id = None  # the next reader starts from now
            self._tracked.clear()

    def publish(self, kind: str, message: dict[str, Any]) -> None:
        data = _sse(kind, message)
        for reader in list(self.readers):
            if kind == "skipped" or reader.wants(message):
                try:
                    reader.queue.put_nowait(data)
                except asyncio.QueueFull:
                    log.info("event=live_reader_dropped reason=queue_full messages=%d", QUEUE_MESSAGES)
                    self._drop(reader)

    def _drop(self, reader: Reader) -> None:
        reader.dropped = True
        self.readers.discard(reader)
        while not reader.queue.empty():  # room for the end marker
            reader.queue.get_nowait()
        reader.queue.put_nowait(None)

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        """One look at the store: what to send (blocking; on a thread)."""
        out: list[tuple[str, dict[str, Any]]] = []
        now = now_ms()
        with self.store.engine.connect().execution_options(readonly=True) as conn:
            if self._after_id is None:
                self._after_id = conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one()
            newest = conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one()
            if newest - self._after_id > EVENTS_PER_POLL:
                skipped = newest - EVENTS_PER_POLL - self._after_id
                out.append(("skipped", {"skipped": skipped, "source": None, "type": None,
                                        "message": f"{skipped} events arrived faster than the live view shows"}))
                self._after_id = newest - EVENTS_PER_POLL
            rows = conn.execute(select(events.c.id, events.c.source, events.c.message_id, events.c.type,
                                       events.c.event_name, events.c.user_id, events.c.received_at_ms,
                                       events.c.payload)
                                .where(events.c.id > self._after_id).order_by(events.c.id)
                                .limit(EVENTS_PER_POLL)).all()
            fresh = []
            for row in rows:
                self._after_id = row.id
                message = {"event_id": row.id, "source": row.source, "message_id": row.message_id,
                           "type": row.type, "event": row.event_name, "user_id": row.user_id,
                           "received_at": iso(row.received_at_ms), "payload": orjson.Fragment(row.payload),
                           "destinations": []}
                self._tracked[row.id] = (message, {})
                fresh.append(row.id)
            while len(self._tracked) > TRACKED_EVENTS:
                self._tracked.popitem(last=False)
            by_event = self._deliveries(conn, list(self._tracked))
        for event_id, (message, seen) in self._tracked.items():
            for d in by_event.get(event_id, []):
                state = _state(d, now)
                if event_id in fresh and d.destination not in message["destinations"]:
                    message["destinations"].append(d.destination)
                before = seen.get(d.id)
                seen[d.id] = (state, d.attempts)
                if state in REPORTED and before != (state, d.attempts):
                    out.append((state, {"event_id": event_id, "source": message["source"], "type": message["type"],
                                        "message_id": message["message_id"], "destination": d.destination,
                                        "delivery_id": d.id, "attempts": d.attempts, "last_error": d.last_error,
                                        "at": iso(d.finished_at_ms or d.last_attempt_at_ms)}))
        accepted = [("accepted", self._tracked[i][0]) for i in fresh]
        # Accepted first: a reader sees an event before its outcomes.
        return [m for m in out if m[0] == "skipped"] + accepted + [m for m in out if m[0] != "skipped"]

    def _deliveries(self, conn: Any, event_ids: list[int]) -> dict[int, list[Any]]:
        found: dict[int, list[Any]] = {}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start:start + 500]
            for row in conn.execute(select(deliveries.c.id, deliveries.c.event_id, deliveries.c.destination,
                                           deliveries.c.state, deliveries.c.attempts, deliveries.c.locked_until_ms,
                                           deliveries.c.last_error, deliveries.c.last_attempt_at_ms,
                                           deliveries.c.finished_at_ms)
                                    .where(deliveries.c.event_id.in_(chunk))):
                found.setdefault(row.event_id, []).append(row)
        return found


def _state(row: Any, now: int) -> str:
    if row.state != "pending":
        return row.state
    if row.locked_until_ms is not None and row.locked_until_ms > now:
        return "in_flight"
    return "retrying" if row.attempts > 0 and row.last_error else "pending"


class LiveApi(ApiHandler):
    KNOWN = frozenset({"source", "type", "destination"})

    async def get(self) -> None:
        args = self.query_arguments()
        reader = Reader(source=args.text("source"), type=args.choice("type", MESSAGE_TYPES),
                        destination=args.text("destination"))
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")  # a proxy in front must not hold the stream
        self._reader = reader
        feed: LiveFeed = self.ctx.live
        feed.join(reader)
        try:
            await self._send(b": trackrelay live events\nretry: 2000\n\n")
            while True:
                try:
                    data = await asyncio.wait_for(reader.queue.get(), HEARTBEAT_SECONDS)
                except asyncio.TimeoutError:
                    data = b": heartbeat\n\n"
                if data is None:  # dropped, or the console is stopping: the connection goes
                    self.request.connection.stream.close()
                    return
                await self._send(data)
        except StreamClosedError:
            return  # gone
        except asyncio.TimeoutError:  # not reading: dropped, its buffer with it
            log.info("event=live_reader_dropped reason=stalled seconds=%g", STALL_SECONDS)
            self.request.connection.stream.close()
            return
        finally:
            feed.leave(reader)

    async def _send(self, data: bytes) -> None:
        self.write(data)
        await asyncio.wait_for(self.flush(), STALL_SECONDS)

    def on_connection_close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            self.ctx.live.leave(reader)
            try:
                reader.queue.put_nowait(None)
            except asyncio.QueueFull:
                reader.queue.get_nowait()
                reader.queue.put_nowait(None)
