"""A source with ``allowed_origins``: the page on the allowed origin is delivered; the same write
key used from another origin is refused ``403 origin_not_allowed``, recorded in ``rejected``, and
nothing of it reaches the webhook."""

from __future__ import annotations

import json

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage, parse_json
from .pages import SEGMENT_EVENTS_JS, SEGMENT_SCRIPT, with_script
from .servers import LOCKED_KEY, Relay, StaticServer

pytestmark = pytest.mark.browser

FETCH_JS = """
async ({relay, writeKey}) => {
  const body = JSON.stringify({type: "track", userId: "foreign-fetch-user", event: "From Elsewhere",
                               messageId: "foreign-fetch", writeKey});
  try {
    const response = await fetch(relay + "/v1/track", {method: "POST", body});
    return {status: response.status, body: await response.text()};
  } catch (error) {
    return {error: String(error)};
  }
}
"""


def inline_settings(relay: Relay) -> dict:
    host = relay.url.removeprefix("http://")
    return {"integrations": {"Segment.io": {"apiKey": LOCKED_KEY, "apiHost": f"{host}/v1", "protocol": "http"}}}


def test_allowed_origin_is_delivered(browser_page: BrowserPage, site: StaticServer, full_relay: Relay,
                                     arrivals: Arrivals) -> None:
    url = site.page("origin-allowed.html", with_script("An allowed origin", SEGMENT_SCRIPT))
    browser_page.goto(url)
    result = browser_page.run(SEGMENT_EVENTS_JS, {
        "load": {"writeKey": LOCKED_KEY, "cdnURL": full_relay.url}, "options": {}, "userId": "allowed-user"})
    assert [s["failed"] for s in result["sent"]] == [None] * 5, f"{result}\n{browser_page.report(full_relay.url)}"
    delivered = arrivals.exactly_once(browser_page, [s["messageId"] for s in result["sent"]], full_relay.url)
    for event in delivered.values():
        assert_browser_context(event, url, "analytics.js")


def test_other_origin_is_refused_and_recorded(browser_page: BrowserPage, elsewhere: StaticServer,
                                              full_relay: Relay, arrivals: Arrivals) -> None:
    relay = full_relay
    url = elsewhere.page("origin-refused.html", with_script("Another origin", SEGMENT_SCRIPT))
    browser_page.goto(url)
    # The plain fetch is a simple request (text/plain, no preflight): it reaches the route.
    fetched = browser_page.run(FETCH_JS, {"relay": relay.url, "writeKey": LOCKED_KEY})
    sdk = browser_page.run(SEGMENT_EVENTS_JS, {
        "load": {"writeKey": LOCKED_KEY, "cdnSettings": inline_settings(relay)}, "options": {},
        "userId": "foreign-user"})
    browser_page.pause(1.0)
    report = browser_page.report(relay.url)
    posts = [e for e in browser_page.network.to(relay.url, "/v1/track") if e.method == "POST"]
    assert [e.status for e in posts] == [403], f"the plain fetch from {elsewhere.origin}:\n{report}"
    answer = parse_json(browser_page.network.body(posts[0]))
    assert isinstance(answer, dict) and answer.get("code") == "origin_not_allowed", f"body {answer!r}\n{report}"
    assert fetched.get("status") == 403 and parse_json(fetched.get("body")) == answer, \
        f"the page could not read the 403 (CORS headers on the refusal?): {fetched}\n{report}"
    # The SDK's calls were refused, whether at their preflight or at the POST: none failed silently.
    sdk_posts = [e for e in browser_page.network.to(relay.url) if e.method == "POST" and e.url != posts[0].url]
    assert sdk_posts and all(e.status == 403 or e.failed for e in sdk_posts), report
    assert not [e for e in arrivals.events() if str(e.get("userId", "")).startswith("foreign")
                or e.get("anonymousId") == sdk["anonymousId"]], f"a refused event was delivered\n{report}"

    def refusals() -> list[dict]:
        return [r for r in relay.rejected() if r["code"] == "origin_not_allowed"]

    rows = browser_page.wait_until(refusals, "origin_not_allowed rows in rejected", 10, lambda: report)
    assert all(r["status"] == 403 for r in rows), rows
    assert any(r["route"] and "track" in r["route"] for r in rows), rows
    assert any(elsewhere.origin in json.dumps(r, default=str) for r in rows), f"the refused origin is not named: {rows}"
