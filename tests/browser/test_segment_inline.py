"""analytics-next from npm (UMD) with inline ``cdnSettings``: no settings request, every event
posted cross-origin to trackrelay and delivered once to the webhook."""

from __future__ import annotations

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage
from .pages import SEGMENT_EVENTS_JS, SEGMENT_SCRIPT, with_script
from .servers import Relay, StaticServer

pytestmark = pytest.mark.browser


def test_inline_cdn_settings_deliver_every_call_once(browser_page: BrowserPage, site: StaticServer,
                                                      relay: Relay, arrivals: Arrivals) -> None:
    url = site.page("segment-inline.html", with_script("analytics-next, inline settings", SEGMENT_SCRIPT))
    browser_page.goto(url)
    host = relay.url.removeprefix("http://")
    cdn_settings = {"integrations": {"Segment.io": {"apiKey": "inline-key", "apiHost": f"{host}/v1",
                                                    "protocol": "http"}}}
    result = browser_page.run(SEGMENT_EVENTS_JS, {
        "load": {"writeKey": "inline-key", "cdnSettings": cdn_settings}, "options": {}, "userId": "inline-user"})
    assert [s["failed"] for s in result["sent"]] == [None] * 5, f"{result}\n{browser_page.report()}"
    delivered = arrivals.exactly_once(browser_page, [s["messageId"] for s in result["sent"]], relay.url)
    for event in delivered.values():
        assert_browser_context(event, url, "analytics.js")
    assert sorted(e["type"] for e in delivered.values()) == ["alias", "group", "identify", "page", "track"]
    assert {e["anonymousId"] for e in delivered.values()} == {result["anonymousId"]}
    posts = [e for e in browser_page.network.to(relay.url) if e.method == "POST"]
    assert posts and all(e.status == 200 and not e.failed for e in posts), browser_page.report(relay.url)
    assert {e.url.removeprefix(relay.url) for e in posts} == {"/v1/p", "/v1/i", "/v1/t", "/v1/g", "/v1/a"}
    browser_page.assert_only_to(site.origin, relay.url)  # no settings request, no remote CDN
