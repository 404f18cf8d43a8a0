"""The HTML of the test pages. Pages only load an SDK; the tests drive it with ``page.evaluate``."""

from __future__ import annotations

import html

from .sdks import RUDDERSTACK_UMD, SEGMENT_UMD

SEGMENT_SCRIPT = f"/sdk/{SEGMENT_UMD}/index.js"
RUDDERSTACK_SCRIPT = f"/sdk/{RUDDERSTACK_UMD}"


def page(title: str, head: str = "") -> str:
    """A small page that shows its title (for the screenshot) and runs ``head``."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{head}</head>"
            f"<body style='font:16px sans-serif;margin:2em'><h1>{html.escape(title)}</h1>"
            f"<pre id='log'></pre></body></html>")


def with_script(title: str, src: str) -> str:
    return page(title, f"<script src='{src}'></script>")


SEGMENT_EVENTS_JS = """
async ({load, options, userId}) => {
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(load, options);
  const calls = [analytics.page(), analytics.identify(userId, {plan: "pro"}),
                 analytics.track("Browser Test", {n: 1}), analytics.group(userId + "-org", {name: "Org"}),
                 analytics.alias(userId + "-alias", userId)];
  const contexts = await Promise.all(calls);
  document.getElementById("log").textContent = contexts.map(c => c.event.type + " " + c.event.messageId).join("\\n");
  return {sent: contexts.map(c => ({type: c.event.type, messageId: c.event.messageId,
                                    failed: c.failedDelivery() ? String(c.failedDelivery().reason) : null})),
          anonymousId: analytics.user().anonymousId()};
}
"""


def segment_snippet(host: str, write_key: str) -> str:
    """Segment's standard snippet (5.2.x) with only its host changed; it never sets ``_cdn``."""
    return """<script>
  !function(){var i="analytics",analytics=window[i]=window[i]||[];if(!analytics.initialize)if(analytics.invoked)window.console&&console.error&&console.error("Segment snippet included twice.");else{analytics.invoked=!0;analytics.methods=["trackSubmit","trackClick","trackLink","trackForm","pageview","identify","reset","group","track","ready","alias","debug","page","screen","once","off","on","addSourceMiddleware","addIntegrationMiddleware","setAnonymousId","addDestinationMiddleware","register"];analytics.factory=function(e){return function(){if(window[i].initialized)return window[i][e].apply(window[i],arguments);var n=Array.prototype.slice.call(arguments);if(["track","screen","alias","group","page","identify"].indexOf(e)>-1){var c=document.querySelector("link[rel='canonical']");n.push({__t:"bpc",c:c&&c.getAttribute("href")||void 0,p:location.pathname,u:location.href,s:location.search,t:document.title,r:document.referrer})}n.unshift(e);analytics.push(n);return analytics}};for(var n=0;n<analytics.methods.length;n++){var key=analytics.methods[n];analytics[key]=analytics.factory(key)}analytics.load=function(key,n){var t=document.createElement("script");t.type="text/javascript";t.async=!0;t.setAttribute("data-global-segment-analytics-key",i);t.src="HOST/analytics.js/v1/" + key + "/analytics.min.js";var r=document.getElementsByTagName("script")[0];r.parentNode.insertBefore(t,r);analytics._loadOptions=n};analytics._writeKey="WRITE_KEY";;analytics.SNIPPET_VERSION="5.2.1";
  analytics.load("WRITE_KEY");
  analytics.page();
  }}();
</script>""".replace("HOST", host).replace("WRITE_KEY", write_key)
