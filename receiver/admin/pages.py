"""The dashboard's pages: Tornado templates over the same queries as the admin API. Lists,
filters and replay are plain links and forms, so they work with JavaScript off; the live view
needs it (Server-Sent Events), and the overview refreshes itself when it is on."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from tornado.web import HTTPError

from pipeline import exactjson
from pipeline.messages import MESSAGE_TYPES
from pipeline.operations import replay_deliveries
from receiver.admin import queries
from receiver.admin.access import AdminHandler
from receiver.admin.api import REPLAY_STATES, Arguments, BadParameter, discard
from receiver.admin.chart import throughput_chart

FAILURE_STATES = ("dead", "retrying")
PAGE_SIZE = 50
# "Replay everything the filter matches" replays at most this many at once (and says so).
REPLAY_ALL_CAP = 100_000


def when(moment: str | None) -> str:
    """An ISO time as a table shows it: to the second, UTC (the full value is in the title)."""
    return "" if not moment else moment[:19].replace("T", " ")


def pretty(value: Any) -> str:
    """JSON indented for reading (a payload read with exactjson keeps its numbers' digits)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


class PageHandler(AdminHandler):
    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(pretty=pretty, quote=quote, when=when,
                         urlencode=urlencode, config=self.ctx.config)
        return namespace

    async def blocking(self, call: Any, *args: Any) -> Any:
        return await asyncio.to_thread(call, *args)

    def arguments(self) -> Arguments:
        return Arguments(lambda name: self.get_argument(name, None))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 400:  # a bad filter: the page again would need the data; say what was wrong
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.render("error.html", status=status_code, reason=self._reason)
            return
        super().write_error(status_code, **kwargs)


class OverviewPage(PageHandler):
    section = "overview"

    async def get(self) -> None:
        overview = await self.blocking(queries.overview, self.ctx.store, self.ctx.config)
        minutes = await self.blocking(queries.throughput, self.ctx.store, 60)
        self.render("overview.html", overview=overview, chart=throughput_chart(minutes),
                    destinations=sorted(overview["destinations"].items()))


class LivePage(PageHandler):
    section = "live"

    def get(self) -> None:
        sources = [s.name for s in self.ctx.config.sources] or ["default"]
        self.render("live.html", sources=sources, types=MESSAGE_TYPES,
                    destinations=[d.name for d in self.ctx.config.destinations])


class FailuresPage(PageHandler):
    section = "failures"

    async def get(self) -> None:
        args = self.arguments()
        state = args.choice("state", FAILURE_STATES) or "dead"
        f = queries.DeliveryFilter(destination=args.text("destination"), state=state,
                                   since_ms=args.moment("since"), until_ms=args.moment("until"),
                                   type=args.choice("type", MESSAGE_TYPES), event=args.text("event"),
                                   user_id=args.text("user_id"))
        page = await self.blocking(queries.deliveries_page, self.ctx.store, f, PAGE_SIZE, args.cursor())
        rejected = await self.blocking(queries.rejected_page, self.ctx.store,
                                       queries.RejectedFilter(reason=args.text("reason")), PAGE_SIZE,
                                       args.cursor("rejected_cursor"))
        overview = await self.blocking(queries.overview, self.ctx.store, self.ctx.config)
        filters = {k: v for k in ("destination", "state", "since", "until", "type", "event", "user_id", "reason")
                   if (v := self.get_argument(k, "").strip())}
        self.render("failures.html", page=page, rejected=rejected, filters=filters, state=state,
                    destinations=sorted(overview["destinations"]), types=MESSAGE_TYPES,
                    orphaned=sorted(n for n, d in overview["destinations"].items() if not d["configured"]),
                    overview=overview, reasons=await self.blocking(queries.rejected_reasons, self.ctx.store))


class ReplayForm(PageHandler):
    """The failures page's Replay buttons (a form post with the CSRF field): one delivery or the
    selection (``ids``), or everything the filter matches (``all``), which first shows a page
    with the count to confirm."""

    section = "failures"

    async def post(self) -> None:
        args = self.arguments()
        back = self.get_body_argument("back", "/failures")
        if not back.startswith("/failures") and not back.startswith("/events/"):
            back = "/failures"
        state = args.choice("state", REPLAY_STATES)
        stored = "pending" if state == "retrying" else state
        if self.get_body_argument("all", None) is not None:
            f = queries.DeliveryFilter(destination=args.text("destination"), state=state or "dead",
                                       since_ms=args.moment("since"), until_ms=args.moment("until"),
                                       type=args.choice("type", MESSAGE_TYPES), event=args.text("event"),
                                       user_id=args.text("user_id"))
            ids = await self.blocking(queries.matching_delivery_ids, self.ctx.store, f, REPLAY_ALL_CAP)
            if self.get_body_argument("confirmed", None) is None:
                fields = {k: v for k in ("destination", "state", "since", "until", "type", "event", "user_id")
                          if (v := self.get_body_argument(k, "").strip())}
                self.render("confirm.html", count=len(ids), capped=len(ids) == REPLAY_ALL_CAP, fields=fields,
                            back=back)
                return
        else:
            # A row's own button replays that row only, whatever else is ticked.
            one = self.get_body_argument("one", None)
            try:
                ids = [int(one)] if one is not None else [int(i) for i in self.get_body_arguments("ids")]
            except ValueError:
                raise BadParameter("ids", "expected delivery ids") from None
            if not ids:
                raise BadParameter("ids", "select at least one delivery to replay")
        count = 0
        if ids:
            count = await self.blocking(lambda: replay_deliveries(self.ctx.store, None, stored, ids=ids,
                                                                  by="console"))
        separator = "&" if "?" in back else "?"
        self.redirect(f"{back}{separator}{urlencode({'replayed': count})}", status=303)


class DiscardForm(PageHandler):
    """The failures page's Discard button for an orphaned destination: first a page with the
    count to confirm, then the deletion."""

    section = "failures"

    async def post(self) -> None:
        destination = self.arguments().text("destination")
        if destination is None:
            raise BadParameter("destination", "required")
        if self.get_body_argument("confirmed", None) is None:
            counted = await discard(self, destination, dry_run=True)  # type: ignore[arg-type]
            self.render("discard.html", destination=destination, count=counted["matched"])
            return
        done = await discard(self, destination, dry_run=False)  # type: ignore[arg-type]
        self.redirect("/failures?" + urlencode({"discarded": done["discarded"]}), status=303)


class EventPage(PageHandler):
    section = "event"

    async def get(self, message_id: str) -> None:
        source = self.arguments().text("source")
        found = await self.blocking(queries.event_detail, self.ctx.store, self.ctx.config, message_id, source,
                                    exactjson.loads)
        if found is None:
            self.set_status(404)
        self.render("event.html", message_id=message_id, found=found)


class SearchPage(PageHandler):
    def get(self) -> None:
        wanted = (self.get_argument("q", "") or "").strip()
        if not wanted:
            raise HTTPError(400, reason="q: type a messageId to look up")
        self.redirect("/events/" + quote(wanted, safe=""))


def page_routes(args: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    return [
        (r"/", OverviewPage, args),
        (r"/live", LivePage, args),
        (r"/failures", FailuresPage, args),
        (r"/failures/replay", ReplayForm, args),
        (r"/orphans/discard", DiscardForm, args),
        (r"/events/([^/]+)", EventPage, args),
        (r"/search", SearchPage, args),
    ]
