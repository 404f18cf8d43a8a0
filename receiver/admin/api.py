"""The admin API: JSON under ``/api/``, the figures and lists the dashboard shows, and replay.

Every query runs on a thread against the console's own pool (receiver/admin/context.py).
A bad parameter is a ``400`` naming it; errors are ``{"error": ..., "status": ...}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from tornado.web import HTTPError

from pipeline.messages import MESSAGE_TYPES
import dataclasses

from pipeline.operations import discard_orphaned, orphaned_destinations, parse_moment, replay_deliveries
from receiver.admin import queries
from receiver.admin.access import AdminHandler

T = TypeVar("T")
# A replay of a list of ids names at most this many (the dashboard's selection is one page).
MAX_REPLAY_IDS = 10_000


class BadParameter(HTTPError):
    def __init__(self, name: str, problem: str) -> None:
        super().__init__(400, reason=f"{name}: {problem}")


class Arguments:
    """A request's filters, checked: each getter raises BadParameter naming the parameter."""

    def __init__(self, get: Callable[[str], Any]) -> None:
        self._get = get

    def text(self, name: str) -> str | None:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadParameter(name, "expected a string")
        value = value.strip()
        return value or None

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.text(name)
        if value is not None and value not in choices:
            raise BadParameter(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def moment(self, name: str) -> int | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            return parse_moment(value)
        except ValueError as exc:
            raise BadParameter(name, str(exc)) from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise BadParameter(name, f"expected an integer from {low} to {high}, got {value!r}") from None
        if not low <= number <= high:
            raise BadParameter(name, f"must be from {low} to {high}, got {number}")
        return number

    def cursor(self, name: str = "cursor") -> int | None:
        value = self.text(name)
        if value is None:
            return None
        if not value.isdigit() or len(value) > 19:
            raise BadParameter(name, "not a cursor this API gave (the next_cursor of the page before)")
        return int(value)

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("", "0", "false", "no", "off"):
            return False
        raise BadParameter(name, f"expected true or false, got {value!r}")

    def delivery_filter(self) -> queries.DeliveryFilter:
        return queries.DeliveryFilter(
            destination=self.text("destination"), state=self.choice("state", queries.DELIVERY_STATES),
            since_ms=self.moment("since"), until_ms=self.moment("until"),
            type=self.choice("type", MESSAGE_TYPES), event=self.text("event"), user_id=self.text("user_id"))

    def rejected_filter(self) -> queries.RejectedFilter:
        return queries.RejectedFilter(since_ms=self.moment("since"), reason=self.text("reason"),
                                      route=self.text("route"))


class ApiHandler(AdminHandler):
    KNOWN: frozenset[str] = frozenset()  # the query parameters this route takes

    def query_arguments(self) -> Arguments:
        unknown = sorted(set(self.request.query_arguments) - self.KNOWN)
        if unknown:
            raise BadParameter(unknown[0], f"unknown parameter (this route takes: {', '.join(sorted(self.KNOWN))})")
        return Arguments(lambda name: self.get_query_argument(name, None))

    def json_body(self) -> dict[str, Any]:
        """A POST's body: a JSON object (no query parameters), else a 400 saying what is wrong."""
        self.query_arguments()
        try:
            body = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, reason=f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, reason="the body must be a JSON object")
        return body

    async def blocking(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)


class OverviewApi(ApiHandler):
    async def get(self) -> None:
        self.query_arguments()
        self.answer_json(await self.blocking(queries.overview, self.ctx.store, self.ctx.config))


class ThroughputApi(ApiHandler):
    KNOWN = frozenset({"minutes"})

    async def get(self) -> None:
        minutes = self.query_arguments().integer("minutes", 60, 1, 24 * 60)
        self.answer_json({"minutes": await self.blocking(queries.throughput, self.ctx.store, minutes)})


class DeliveriesApi(ApiHandler):
    KNOWN = frozenset({"destination", "state", "since", "until", "type", "event", "user_id", "limit", "cursor"})

    async def get(self) -> None:
        args = self.query_arguments()
        f, limit, cursor = args.delivery_filter(), args.integer("limit", 50, 1, queries.MAX_LIMIT), args.cursor()
        self.answer_json(await self.blocking(queries.deliveries_page, self.ctx.store, f, limit, cursor))


class EventApi(ApiHandler):
    KNOWN = frozenset({"source"})

    async def get(self, message_id: str) -> None:
        source = self.query_arguments().text("source")
        found = await self.blocking(queries.event_detail, self.ctx.store, self.ctx.config, message_id, source)
        if found is None:
            raise HTTPError(404, reason=f"no stored event with messageId {message_id!r}"
                            + (f" in source {source!r}" if source else ""))
        self.answer_json(found)


class RejectedApi(ApiHandler):
    KNOWN = frozenset({"since", "reason", "route", "limit", "cursor"})

    async def get(self) -> None:
        args = self.query_arguments()
        f, limit, cursor = args.rejected_filter(), args.integer("limit", 50, 1, queries.MAX_LIMIT), args.cursor()
        self.answer_json(await self.blocking(queries.rejected_page, self.ctx.store, f, limit, cursor))


REPLAY_STATES = ("dead", "pending", "retrying", "delivered")


class ReplayApi(ApiHandler):
    """``POST /api/replay``: a JSON object with the CLI's filters (``destination``, ``state``,
    ``since``, ``until``, ``type``, ``dry_run``) or ``ids`` (delivery ids). Answers
    ``{"matched": N}``, plus ``"replayed": N`` unless a dry run."""

    FIELDS = frozenset({"destination", "state", "since", "until", "type", "dry_run", "ids"})

    async def post(self) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - self.FIELDS)
        if unknown:
            raise BadParameter(unknown[0], f"unknown field (known: {', '.join(sorted(self.FIELDS))})")
        self.answer_json(await self.replay(Arguments(body.get), body.get("ids")))

    async def replay(self, args: Arguments, ids: Any) -> dict[str, int]:
        destination, state = args.text("destination"), args.choice("state", REPLAY_STATES)
        since, until, kind, dry_run = args.moment("since"), args.moment("until"), args.choice("type", MESSAGE_TYPES), \
            args.flag("dry_run")
        if ids is not None:
            if not isinstance(ids, list) or not ids or len(ids) > MAX_REPLAY_IDS or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
                raise BadParameter("ids", f"expected a list of 1 to {MAX_REPLAY_IDS} delivery ids")
        elif destination is None:
            raise BadParameter("destination", "required unless ids are given (as `trackrelay replay --destination`)")
        # "retrying" is how the console names a pending delivery with attempts behind it: a
        # replay of it is the CLI's --state pending (retry now, fresh attempts).
        stored_state = "pending" if state == "retrying" else state
        if stored_state is None and ids is None:
            stored_state = "dead"
        # One statement: what it matched is what it put back (an UPDATE's row count).
        count = await self.blocking(lambda: replay_deliveries(
            self.ctx.store, destination, stored_state, since, until, kind, dry_run=dry_run, ids=ids, by="console"))
        return {"matched": count} if dry_run else {"matched": count, "replayed": count}


class OrphansApi(ApiHandler):
    """``GET /api/orphans``: destinations no longer configured whose deliveries wait."""

    async def get(self) -> None:
        self.query_arguments()
        found = await self.blocking(orphaned_destinations, self.ctx.store, self.ctx.config)
        self.answer_json({"orphans": [dataclasses.asdict(o) for o in found]})


class DiscardApi(ApiHandler):
    """``POST /api/orphans/discard`` with ``{"destination": NAME, "dry_run": false}``: delete an
    orphaned destination's pending and dead deliveries (``trackrelay discard``'s function).
    Answers ``{"matched": N}`` (and ``"discarded": N`` unless a dry run); a configured
    destination is a 400."""

    async def post(self) -> None:
        body = self.json_body()
        args = Arguments(body.get)
        destination, dry_run = args.text("destination"), args.flag("dry_run")
        if destination is None:
            raise BadParameter("destination", "required")
        self.answer_json(await discard(self, destination, dry_run))


async def discard(handler: ApiHandler, destination: str, dry_run: bool) -> dict[str, int]:
    try:
        count = await handler.blocking(lambda: discard_orphaned(handler.ctx.store, handler.ctx.config, destination,
                                                                dry_run=dry_run, by="console"))
    except ValueError as exc:
        raise BadParameter("destination", str(exc)) from None
    return {"matched": count} if dry_run else {"matched": count, "discarded": count}


def api_routes(args: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    return [
        (r"/api/overview", OverviewApi, args),
        (r"/api/throughput", ThroughputApi, args),
        (r"/api/deliveries", DeliveriesApi, args),
        (r"/api/events/([^/]+)", EventApi, args),
        (r"/api/rejected", RejectedApi, args),
        (r"/api/replay", ReplayApi, args),
        (r"/api/orphans", OrphansApi, args),
        (r"/api/orphans/discard", DiscardApi, args),
    ]
