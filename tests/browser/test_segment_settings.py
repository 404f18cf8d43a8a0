"""analytics-next from npm (UMD) loading its settings from trackrelay (``cdnURL``): the settings
answer points ``Segment.io`` at trackrelay, and every call is delivered once, in standard mode
(one POST per call) and in batching mode (POSTs to ``/v1/b``)."""

from __future__ import annotations

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage, parse_json
from .pages import SEGMENT_EVENTS_JS, SEGMENT_SCRIPT, with_script
from .servers import Relay, StaticServer

pytestmark = pytest.mark.browser
BATCHING = {"integrations": {"Segment.io": {"deliveryStrategy": {"strategy": "batching",
                                                                 "config": {"size": 5, "timeout": 500}}}}}


@pytest.mark.parametrize(("mode", "write_key", "options", "paths"), [
    ("standard", "settings-key", {}, {"/v1/p", "/v1/i", "/v1/t", "/v1/g", "/v1/a"}),
    ("batching", "batching-key", BATCHING, {"/v1/b"}),
])
def test_settings_from_trackrelay_deliver_every_call_once(browser_page: BrowserPage, site: StaticServer, relay: Relay,
                                                           arrivals: Arrivals, mode: str, write_key: str,
                                                           options: dict, paths: set[str]) -> None:
    url = site.page(f"segment-{mode}.html", with_script(f"analytics-next, {mode}, settings from trackrelay",
                                                        SEGMENT_SCRIPT))
    browser_page.goto(url)
    result = browser_page.run(SEGMENT_EVENTS_JS, {
        "load": {"writeKey": write_key, "cdnURL": relay.url}, "options": options, "userId": f"{mode}-user"})
    report = browser_page.report(relay.url)
    settings = browser_page.network.to(relay.url, f"/v1/projects/{write_key}/settings")
    gets = [e for e in settings if e.method == "GET"]
    assert [e.status for e in gets] == [200], f"the settings request:\n{report}"
    answer = parse_json(browser_page.network.body(gets[0])) or {}
    segment = answer.get("integrations", {}).get("Segment.io", {})
    assert (segment.get("apiHost"), segment.get("protocol")) == (relay.url.removeprefix("http://") + "/v1", "http"), \
        f"the settings answer: {answer}"
    assert [s["failed"] for s in result["sent"]] == [None] * 5, f"{result}\n{report}"
    delivered = arrivals.exactly_once(browser_page, [s["messageId"] for s in result["sent"]], relay.url)
    for event in delivered.values():
        assert_browser_context(event, url, "analytics.js")
    assert {e["anonymousId"] for e in delivered.values()} == {result["anonymousId"]}
    posts = [e for e in browser_page.network.to(relay.url) if e.method == "POST"]
    assert posts and all(e.status == 200 and not e.failed for e in posts), report
    assert {e.url.removeprefix(relay.url) for e in posts} == paths, report
    browser_page.assert_only_to(site.origin, relay.url)
