"""What a page sent and got, recorded through the DevTools protocol (not ``page.route``, which
would answer CORS preflights itself and hide the server's), and what it printed on the console.

Playwright's sync API delivers these events only while a Playwright call is running: waits in
the tests go through :meth:`BrowserPage.pause`, never ``time.sleep``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from playwright.sync_api import BrowserContext, CDPSession, Page


@dataclass
class Exchange:
    """One request as DevTools saw it: a preflight is an exchange of its own."""

    request_id: str
    method: str
    url: str
    kind: str
    request_headers: dict[str, str]
    post_data: str | None
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    extra_request_headers: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    blocked_reason: str | None = None
    cors_error: dict[str, Any] | None = None
    finished: bool = False

    def header(self, name: str) -> str | None:
        """A response header, case-insensitively."""
        return next((v for k, v in self.response_headers.items() if k.lower() == name.lower()), None)

    @property
    def failed(self) -> bool:
        return self.failure is not None or self.blocked_reason is not None or self.cors_error is not None

    def describe(self) -> str:
        line = f"{self.method} {self.url} [{self.kind}] -> {self.status if self.status is not None else 'no answer'}"
        if self.failed:
            line += f" FAILED {self.failure or ''} blockedReason={self.blocked_reason} corsError={self.cors_error}"
        interesting = {k: v for k, v in self.response_headers.items()
                       if k.lower().startswith("access-control") or k.lower() in ("retry-after", "content-type")}
        if interesting:
            line += f" headers={interesting}"
        if self.post_data:
            line += f" body={self.post_data[:300]}"
        return line


class NetworkRecord:
    """Every exchange of one page, by DevTools request id (a redirect starts a new exchange)."""

    def __init__(self, cdp: CDPSession) -> None:
        self.cdp = cdp
        self.exchanges: list[Exchange] = []
        self._by_id: dict[str, Exchange] = {}
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "Network.requestWillBeSent": self._sent, "Network.responseReceived": self._answered,
            "Network.loadingFailed": self._failed, "Network.loadingFinished": self._finished,
            "Network.requestWillBeSentExtraInfo": self._sent_extra,
            "Network.responseReceivedExtraInfo": self._answered_extra}
        for name, handler in handlers.items():
            cdp.on(name, handler)
        cdp.send("Network.enable")

    def _sent(self, params: dict[str, Any]) -> None:
        request = params["request"]
        exchange = Exchange(params["requestId"], request["method"], request["url"], params.get("type", "?"),
                            dict(request.get("headers", {})), request.get("postData"))
        self._by_id[exchange.request_id] = exchange
        self.exchanges.append(exchange)

    def _exchange(self, params: dict[str, Any]) -> Exchange | None:
        return self._by_id.get(params["requestId"])

    def _answered(self, params: dict[str, Any]) -> None:
        if (exchange := self._exchange(params)) is not None:
            exchange.status = params["response"]["status"]
            exchange.response_headers = {**exchange.response_headers, **params["response"].get("headers", {})}

    def _answered_extra(self, params: dict[str, Any]) -> None:
        if (exchange := self._exchange(params)) is not None:
            exchange.response_headers = {**params.get("headers", {}), **exchange.response_headers}
            exchange.status = exchange.status or params.get("statusCode")

    def _sent_extra(self, params: dict[str, Any]) -> None:
        if (exchange := self._exchange(params)) is not None:
            exchange.extra_request_headers = dict(params.get("headers", {}))

    def _failed(self, params: dict[str, Any]) -> None:
        if (exchange := self._exchange(params)) is not None:
            exchange.failure = params.get("errorText")
            exchange.blocked_reason = params.get("blockedReason")
            exchange.cors_error = params.get("corsErrorStatus")

    def _finished(self, params: dict[str, Any]) -> None:
        if (exchange := self._exchange(params)) is not None:
            exchange.finished = True

    def to(self, base_url: str, path_prefix: str = "") -> list[Exchange]:
        """The exchanges with ``base_url`` (whose path starts with ``path_prefix``)."""
        return [e for e in self.exchanges if e.url.startswith(base_url + path_prefix)]

    def body(self, exchange: Exchange) -> str | None:
        """The response body DevTools kept (once the response has finished loading), else None."""
        try:
            return self.cdp.send("Network.getResponseBody", {"requestId": exchange.request_id})["body"]
        except Exception:  # no body kept (a failed or blocked request): the caller's assertion says so
            return None

    def describe(self, base_url: str | None = None) -> str:
        chosen = self.exchanges if base_url is None else self.to(base_url)
        return "\n".join(f"  {e.describe()}" for e in chosen) or "  (no requests)"


# How long run() waits for the page's requests in flight to show their answers in the record.
SETTLE_SECONDS = 3.0


class BrowserPage:
    """A fresh browser context with one page, its network record and its console."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.network = NetworkRecord(context.new_cdp_session(self.page))
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="load", timeout=15_000)

    def run(self, script: str, arg: Any = None) -> Any:
        """``page.evaluate``; a script that throws fails the test with what the page sent. Returns
        once the network record has caught up with the requests the script made (DevTools events
        arrive only while a Playwright call runs: an answer the page already has may not be in
        the record yet), waiting at most SETTLE_SECONDS for those still in flight."""
        try:
            result = self.page.evaluate(script, arg)
        except Exception as exc:
            raise AssertionError(f"the page's script failed: {exc}\n{self.report()}") from exc
        deadline = time.monotonic() + SETTLE_SECONDS
        self.pause(0.05)
        while any(e.status is None and not e.failed and not e.finished for e in self.network.exchanges) \
                and time.monotonic() < deadline:
            self.pause(0.1)
        return result

    def pause(self, seconds: float) -> None:
        """Wait while DevTools events keep arriving."""
        self.page.wait_for_timeout(seconds * 1000)

    def wait_until(self, condition: Callable[[], Any], what: str, timeout: float, report: Callable[[], str]) -> Any:
        """Poll ``condition`` (letting browser events in) until truthy; fail with ``report()``."""
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{report()}")
            self.pause(0.1)
        return value

    def assert_only_to(self, *origins: str) -> None:
        """No request left for a remote CDN or API: everything went to the servers of the test."""
        elsewhere = [e for e in self.network.exchanges if not e.url.startswith(origins)]
        assert not elsewhere, "requests outside the test's servers:\n" + "\n".join(e.describe() for e in elsewhere)

    def report(self, base_url: str | None = None) -> str:
        """What the page sent (to ``base_url``) and printed: for assertion messages."""
        console = "\n".join(f"  {line}" for line in self.console[-40:]) or "  (nothing)"
        to = f" to {base_url}" if base_url else ""
        return f"requests{to}:\n{self.network.describe(base_url)}\nconsole:\n{console}"

    def close(self) -> None:
        self.context.close()


def parse_json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
