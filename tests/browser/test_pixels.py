"""What needs no SDK: an ``<img>`` pixel with base64 ``data``, one with dotted query keys, and
``navigator.sendBeacon`` (text/plain, no preflight), each delivered once."""

from __future__ import annotations

import pytest

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage
from .pages import page
from .servers import Relay, StaticServer

pytestmark = pytest.mark.browser
WRITE_KEY = "pixel-key"

SEND_JS = """
async ({relay, writeKey}) => {
  // An <img> has no SDK to fill context.userAgent in: trackrelay takes the request's own
  // User-Agent for pixels. The beacon's page script sets it, as an SDK would.
  const context = {page: {url: location.href}, library: {name: "pixel"}};
  const image = (src) => new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve({src, loaded: true, width: img.naturalWidth});
    img.onerror = () => resolve({src, loaded: false});
    img.src = src;
    document.body.appendChild(img);
  });
  const base64 = {type: "track", userId: "pixel-user", event: "Pixel Viewed", messageId: "pixel-base64",
                  writeKey, properties: {plan: "pro"}, context};
  const dotted = new URLSearchParams({userId: "pixel-user", event: "Pixel Dotted", writeKey,
                                      "properties.plan": "pro", messageId: "pixel-dotted",
                                      "context.page.url": location.href, "context.library.name": "pixel"});
  const images = await Promise.all([
    image(relay + "/v1/pixel/track?data=" + encodeURIComponent(btoa(JSON.stringify(base64)))),
    image(relay + "/v1/pixel/track?" + dotted)]);
  const beacon = navigator.sendBeacon(relay + "/v1/track", JSON.stringify({
    userId: "pixel-user", event: "Beacon Sent", messageId: "pixel-beacon", writeKey,
    properties: {plan: "pro"}, context: {...context, userAgent: navigator.userAgent, library: {name: "beacon"}}}));
  document.getElementById("log").textContent = JSON.stringify({images, beacon}, null, 2);
  return {images, beacon};
}
"""


def test_pixels_and_beacon_deliver_once(browser_page: BrowserPage, site: StaticServer, relay: Relay,
                                        arrivals: Arrivals) -> None:
    url = site.page("pixels.html", page("Pixels and a beacon"))
    browser_page.goto(url)
    result = browser_page.run(SEND_JS, {"relay": relay.url, "writeKey": WRITE_KEY})
    assert result["beacon"] is True and all(i["loaded"] and i["width"] == 1 for i in result["images"]), \
        f"{result}\n{browser_page.report(relay.url)}"
    delivered = arrivals.exactly_once(browser_page, ["pixel-base64", "pixel-dotted", "pixel-beacon"], relay.url)
    user_agent = browser_page.run("() => navigator.userAgent", None)
    for event in delivered.values():
        assert_browser_context(event, url)
        assert event["context"]["userAgent"] == user_agent, event
        assert (event["type"], event["userId"], event["properties"]) == ("track", "pixel-user", {"plan": "pro"}), event
    assert [delivered[i]["event"] for i in ("pixel-base64", "pixel-dotted", "pixel-beacon")] == \
        ["Pixel Viewed", "Pixel Dotted", "Beacon Sent"]
    sent = browser_page.network.to(relay.url)
    pixels = [e for e in sent if "/v1/pixel/" in e.url]
    beacons = [e for e in sent if e.url == f"{relay.url}/v1/track"]
    report = browser_page.report(relay.url)
    assert [(e.status, e.header("content-type")) for e in pixels] == [(200, "image/gif")] * 2, report
    assert [(e.method, e.status) for e in beacons] == [("POST", 200)], report
    assert not [e for e in sent if e.method == "OPTIONS"], f"a beacon of text/plain needs no preflight:\n{report}"
