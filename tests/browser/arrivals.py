"""What reached the webhook sink behind trackrelay, checked event by event: every message the
browser sent arrives exactly once (by messageId), with the browser's context filled in."""

from __future__ import annotations

from collections import Counter
from typing import Any

from http_sink import HttpSink

from .network import BrowserPage

ARRIVAL_SECONDS = 20.0
# After the last expected event, how long a duplicate has to show up before we call it once.
SETTLE_SECONDS = 0.7


class Arrivals:
    """The events the sink has received (webhook ``batch_size = 1``: one event per request)."""

    def __init__(self, sink: HttpSink) -> None:
        self.sink = sink

    def events(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for body in self.sink.bodies():
            found += body["batch"] if isinstance(body, dict) and "batch" in body else [body]
        return found

    def where(self, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if all(e.get(k) == v for k, v in fields.items())]

    def exactly_once(self, browser: BrowserPage, message_ids: list[str], relay_url: str,
                     timeout: float = ARRIVAL_SECONDS) -> dict[str, dict[str, Any]]:
        """Wait (bounded) until every id has arrived, then check none arrived twice; by id."""
        wanted = set(message_ids)
        assert len(wanted) == len(message_ids), f"the page sent a messageId twice: {message_ids}"

        def arrived() -> bool:
            return wanted <= {e.get("messageId") for e in self.events()}

        def report() -> str:
            seen = Counter(e.get("messageId") for e in self.events())
            missing = sorted(wanted - set(seen))
            return f"missing at the sink: {missing}\n{browser.report(relay_url)}"

        browser.wait_until(arrived, f"{len(wanted)} events at the webhook sink", timeout, report)
        browser.pause(SETTLE_SECONDS)
        counts = Counter(e.get("messageId") for e in self.events() if e.get("messageId") in wanted)
        twice = {i: n for i, n in counts.items() if n != 1}
        assert not twice, f"events delivered more than once: {twice}\n{browser.report(relay_url)}"
        return {e["messageId"]: e for e in self.events() if e.get("messageId") in wanted}


def assert_browser_context(event: dict[str, Any], page_url: str, library: str | None = None) -> None:
    """The event carries the page's URL, the browser's user agent and the SDK's name."""
    context = event.get("context") or {}
    where = f"{event.get('type')} {event.get('messageId')}: context={context}"
    assert str((context.get("page") or {}).get("url", "")).startswith(page_url), f"context.page.url wrong in {where}"
    assert "Chrome" in str(context.get("userAgent", "")), f"context.userAgent missing in {where}"
    name = (context.get("library") or {}).get("name")
    assert name and (library is None or name == library), f"context.library.name is {name!r}, not {library!r}: {where}"
