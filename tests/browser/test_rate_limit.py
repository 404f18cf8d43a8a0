"""A source with ``rate_limit_per_second = 2`` and ``rate_limit_burst = 3``: a burst of ten
calls from analytics-next meets ``429`` with ``Retry-After``, the SDK retries, and all ten are
delivered once; the refusals are counted in ``rejected`` (``rate_limited``, one row per interval)."""

from __future__ import annotations

import re

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage
from .pages import SEGMENT_SCRIPT, with_script
from .servers import LIMITED_KEY, Relay, StaticServer

pytestmark = pytest.mark.browser
BURST = 10

BURST_JS = """
async ({load, count}) => {
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(load);
  const contexts = await Promise.all(Array.from({length: count}, (_, i) => analytics.track("Burst " + i, {i})));
  document.getElementById("log").textContent = contexts.map(c => c.event.event + " " + c.event.messageId).join("\\n");
  return contexts.map(c => c.event.messageId);
}
"""


def test_burst_meets_429_and_every_event_arrives_once(browser_page: BrowserPage, site: StaticServer,
                                                      full_relay: Relay, arrivals: Arrivals) -> None:
    relay = full_relay
    host = relay.url.removeprefix("http://")
    settings = {"integrations": {"Segment.io": {"apiKey": LIMITED_KEY, "apiHost": f"{host}/v1", "protocol": "http"}}}
    url = site.page("rate-limit.html", with_script("A burst against a rate limit", SEGMENT_SCRIPT))
    browser_page.goto(url)
    ids = browser_page.run(BURST_JS, {"load": {"writeKey": LIMITED_KEY, "cdnSettings": settings},
                                                "count": BURST})
    delivered = arrivals.exactly_once(browser_page, ids, relay.url, timeout=60)
    for event in delivered.values():
        assert_browser_context(event, url, "analytics.js")
    report = browser_page.report(relay.url)
    posts = [e for e in browser_page.network.to(relay.url, "/v1/t") if e.method == "POST"]
    limited = [e for e in posts if e.status == 429]
    assert limited, f"no 429 in a burst of {BURST} against a burst of 3:\n{report}"
    assert all(e.header("retry-after") for e in limited), f"a 429 without Retry-After:\n{report}"
    assert "retry-after" in (limited[0].header("access-control-expose-headers") or "").lower(), \
        f"the SDK cannot read Retry-After cross-origin:\n{report}"
    assert {e.status for e in posts} <= {200, 429}, report
    assert len([e for e in posts if e.status == 200]) == BURST, report

    def rows() -> list[dict]:
        return [r for r in relay.rejected() if r["code"] == "rate_limited"]

    def all_counted() -> bool:
        return sum(refused_count(r) for r in rows()) >= len(limited)

    browser_page.wait_until(all_counted, f"rate_limited rows in rejected counting the {len(limited)} 429s", 30,
                            lambda: f"rejected: {relay.rejected()}")
    assert sum(refused_count(r) for r in rows()) == len(limited), rows()
    assert all((r["status"], r["source"]) == (429, "limited") for r in rows()), rows()
    assert len(rows()) < len(limited), f"one row per refused request, not a summary per interval: {rows()}"


def refused_count(row: dict) -> int:
    """How many refusals a summary row counts: its reason starts with the number."""
    match = re.match(r"(\d+) request", row["reason"])
    assert match, f"a rate_limited row whose reason does not start with its count: {row}"
    return int(match.group(1))
