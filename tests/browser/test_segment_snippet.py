"""analytics-next served first-party by trackrelay (``[receiver] browser_sdk_dir``) and loaded by
Segment's standard snippet with only its host changed: the bundle finds trackrelay as its CDN by
itself (the page sets no ``_cdn``), loads its settings and its chunks from there, and every call
is delivered once."""

from __future__ import annotations

import json

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage
from .pages import page, segment_snippet
from .servers import Relay, StaticServer

pytestmark = pytest.mark.browser
WRITE_KEY = "snippet-key"
# ajs_aid in the page's URL sets the anonymousId, and makes the bundle load its queryString chunk.
ANONYMOUS_ID = "snippet-anonymous"

SEND_JS = """
async ({userId}) => {
  const deadline = Date.now() + 15000;
  while (!(window.analytics && window.analytics.initialized)) {
    if (Date.now() > deadline) throw new Error("analytics.js did not initialize within 15 s");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const analytics = window.analytics;
  const contexts = await Promise.all([analytics.identify(userId, {plan: "pro"}), analytics.track("Browser Test"),
                                      analytics.group(userId + "-org"), analytics.alias(userId + "-alias", userId)]);
  return {sent: contexts.map(c => ({type: c.event.type, messageId: c.event.messageId})),
          anonymousId: analytics.user().anonymousId()};
}
"""


def test_snippet_loads_the_first_party_bundle_and_delivers_once(browser_page: BrowserPage, site: StaticServer,
                                                                full_relay: Relay, arrivals: Arrivals) -> None:
    relay = full_relay
    snippet = segment_snippet(relay.url, WRITE_KEY)
    assert "_cdn" not in snippet  # finding its CDN is the bundle's job
    url = site.page("segment-snippet.html", page("analytics.js from the snippet", snippet))
    browser_page.goto(f"{url}?ajs_aid={ANONYMOUS_ID}")
    result = browser_page.run(SEND_JS, {"userId": "snippet-user"})
    report = browser_page.report()
    # The settings and the chunk come from where the bundle believes its CDN is: trackrelay.
    gets = {e.url.removeprefix(relay.url).split("?")[0]: e for e in browser_page.network.to(relay.url)
            if e.method == "GET"}
    for path in (f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js", f"/v1/projects/{WRITE_KEY}/settings"):
        assert path in gets and gets[path].status == 200, f"GET {path}:\n{report}"
    chunks = [p for p in gets if p.startswith("/analytics-next/bundles/queryString.bundle.")]
    assert chunks and all(gets[p].status == 200 for p in chunks), f"the queryString chunk:\n{report}"
    page_posts = [e for e in browser_page.network.to(relay.url, "/v1/p") if e.method == "POST"]
    assert len(page_posts) == 1, f"the snippet's analytics.page():\n{report}"
    page_id = json.loads(page_posts[0].post_data or "{}").get("messageId")
    delivered = arrivals.exactly_once(browser_page, [page_id] + [s["messageId"] for s in result["sent"]], relay.url)
    for event in delivered.values():
        assert_browser_context(event, url, "analytics.js")
    assert {e["anonymousId"] for e in delivered.values()} == {ANONYMOUS_ID} == {result["anonymousId"]}
    posts = [e for e in browser_page.network.to(relay.url) if e.method == "POST"]
    assert all(e.status == 200 and not e.failed for e in posts), report
    browser_page.assert_only_to(site.origin, relay.url)
