"""RudderStack's JavaScript SDK v3 (the npm package's bundled UMD build, its plugins inside):
its source config comes from trackrelay's ``/sourceConfig`` (Basic auth, so a preflight), and
every call is delivered once."""

from __future__ import annotations

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage
from .pages import RUDDERSTACK_SCRIPT, with_script
from .servers import Relay, StaticServer

pytestmark = pytest.mark.browser
WRITE_KEY = "rudder-key"
LIBRARY = "RudderLabs JavaScript SDK"

SEND_JS = """
async ({writeKey, relay, userId}) => {
  const analytics = new rudderanalytics.RudderAnalytics();
  await new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error("rudderanalytics did not call onLoaded within 15 s")), 15000);
    // Load options as the README gives them: the bundled build needs no plugin or destination URLs
    // (the test fails on any request that leaves the test's servers).
    analytics.load(writeKey, relay, {configUrl: relay, onLoaded: () => resolve()});
  });
  const sent = [];
  const record = (call) => new Promise((resolve) => call((event) => { sent.push(event); resolve(); }));
  await Promise.all([
    record((done) => analytics.page("Docs", "Browser Test Page", {n: 1}, done)),
    record((done) => analytics.identify(userId, {plan: "pro"}, done)),
    record((done) => analytics.track("Browser Test", {n: 1}, done)),
    record((done) => analytics.group(userId + "-org", {name: "Org"}, done)),
    record((done) => analytics.alias(userId + "-alias", userId, done))]);
  document.getElementById("log").textContent = sent.map(e => e && e.type + " " + e.messageId).join("\\n");
  return {sent: sent.map(e => e && {type: e.type, messageId: e.messageId}), anonymousId: analytics.getAnonymousId()};
}
"""


def test_rudderstack_sdk_loads_source_config_and_delivers_once(browser_page: BrowserPage, site: StaticServer,
                                                               relay: Relay, arrivals: Arrivals) -> None:
    url = site.page("rudderstack.html", with_script("RudderStack JS SDK v3", RUDDERSTACK_SCRIPT))
    browser_page.goto(url)
    result = browser_page.run(SEND_JS, {"writeKey": WRITE_KEY, "relay": relay.url, "userId": "rudder-user"})
    report = browser_page.report(relay.url)
    config = [e for e in browser_page.network.to(relay.url, "/sourceConfig") if e.method == "GET"]
    assert [e.status for e in config] == [200], f"the source config request:\n{report}"
    preflights = [e for e in browser_page.network.to(relay.url, "/sourceConfig") if e.method == "OPTIONS"]
    assert preflights and all(e.status in (200, 204) and not e.failed for e in preflights), report
    assert len(result["sent"]) == 5 and all(result["sent"]), f"{result}\n{report}"
    delivered = arrivals.exactly_once(browser_page, [s["messageId"] for s in result["sent"]], relay.url)
    for event in delivered.values():
        assert_browser_context(event, url, LIBRARY)
    assert sorted(e["type"] for e in delivered.values()) == ["alias", "group", "identify", "page", "track"]
    assert {e["anonymousId"] for e in delivered.values()} == {result["anonymousId"]}
    posts = [e for e in browser_page.network.to(relay.url) if e.method == "POST"]
    assert posts and all(e.status == 200 and not e.failed for e in posts), report
    assert {e.url.removeprefix(relay.url) for e in posts} == {"/v1/page", "/v1/identify", "/v1/track",
                                                              "/v1/group", "/v1/alias"}, report
    browser_page.assert_only_to(site.origin, relay.url)
