"""The HTTP destinations behind an egress proxy: a real proxy (proxy.py, from PyPI) on loopback.

Plain HTTP goes to the proxy in absolute form; HTTPS goes through a CONNECT tunnel to a real
TLS sink whose certificate a throwaway CA (trustme) signed, trusted through ``SSL_CERT_FILE``
as any OpenSSL client trusts a private CA. The proxy is chosen from ``HTTP_PROXY``,
``HTTPS_PROXY`` and ``NO_PROXY`` (or their lower-case forms) when the destination starts.
What the proxy saw is read from its access log: a line for each connection, naming its first
request (``POST host:port/path`` when it came in absolute form) or its tunnel.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from http_sink import HttpSink, closed_port_url
from pipeline.destinations.base import DELIVERED, Event, Outcome
from pipeline.destinations.contract import contract_events, while_started
from pipeline.destinations.httpclient import Proxy, environment_proxy
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions
from pipeline_harness import wait_for

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD")
USER, PASSWORD = "ann", "s3cret-pw"


class ProxyProcess:
    """``python -m proxy`` (proxy.py) on a free loopback port, its log in a file."""

    def __init__(self, log_path: Path, basic_auth: str | None = None) -> None:
        self.port = int(closed_port_url().rsplit(":", 1)[1])
        argv = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(self.port),
                "--num-workers", "1", "--num-acceptors", "1"]
        # Its state stays in the test's directory, not under the home directory.
        argv += [f"--{name}-dir={log_path.parent / name}" for name in ("data", "ca-cert", "cache")]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(argv + (["--basic-auth", basic_auth] if basic_auth else []),
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._listening, "proxy.py to listen")

    def _listening(self) -> bool:
        assert self.popen.poll() is None, f"proxy.py exited:\n{self.log()}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def seen(self) -> list[str]:
        """What it was asked for, one entry a connection: ``POST host:port/path`` or ``CONNECT host:port``."""
        return re.findall(r"access_log:\d+ - [0-9.]+:\d+ - ((?:CONNECT \S+)|(?:[A-Z]+ \S+))", self.log())

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture(autouse=True)
def _no_proxy_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the variables it means; none come from the shell that runs it."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    running = ProxyProcess(tmp_path_factory.mktemp("proxy") / "proxy.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    running = ProxyProcess(tmp_path_factory.mktemp("auth-proxy") / "proxy.log", f"{USER}:{PASSWORD}")
    yield running
    running.stop()


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    running = HttpSink()
    yield running
    running.stop()


@pytest.fixture
def trusted_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A throwaway CA that the process trusts (and nothing else) for the test's length."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    return ca


class TlsSinkHandler(RequestHandler):
    def initialize(self, bodies: list[bytes]) -> None:
        self.bodies = bodies

    def post(self, *_: Any) -> None:
        self.bodies.append(self.request.body)


def deliver(url: str, events: list[Event], **options: Any) -> list[Outcome]:
    destination = WebhookDestination("hook", WebhookOptions(url=url, **options), 1)
    return asyncio.run(while_started(destination, lambda d: d.deliver(events)))


def deliver_over_tls(ca: trustme.CA, events: list[Event], **options: Any) -> tuple[list[Outcome], list[bytes], int]:
    """Deliver to a Tornado TLS sink on loopback (certificate for 127.0.0.1 from ``ca``):
    the outcomes, the bodies it received and its port."""
    bodies: list[bytes] = []
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def scenario() -> list[Outcome]:
        server = HTTPServer(Application([(r"/.*", TlsSinkHandler, {"bodies": bodies})]), ssl_options=server_context)
        server.add_sockets(sockets)
        try:
            destination = WebhookDestination("hook", WebhookOptions(url=f"https://127.0.0.1:{port}/in", **options), 1)
            return await while_started(destination, lambda d: d.deliver(events))
        finally:
            server.stop()
            await server.close_all_connections()

    return asyncio.run(scenario()), bodies, port


def test_an_http_destination_goes_through_http_proxy_in_absolute_form(
        proxy: ProxyProcess, sink: HttpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    events = contract_events(12)
    before = len(proxy.seen())

    assert deliver(sink.url + "/in?tenant=1", events, concurrency=3) == [DELIVERED] * 12

    assert sorted(body["messageId"] for body in sink.bodies()) == sorted(event["messageId"] for event in events)
    assert {(r.path, r.headers["Host"]) for r in sink.requests} == {("/in", sink.url.removeprefix("http://"))}
    authority = sink.url.removeprefix("http://")
    # proxy.py logs a connection (its first request) when it closes: one line for each of ours.
    seen = wait_for(lambda: proxy.seen()[before:], "the proxy's access log lines")
    assert set(seen) == {f"POST {authority}/in?tenant=1"} and len(seen) <= 3


def test_an_https_destination_goes_through_a_connect_tunnel(
        proxy: ProxyProcess, trusted_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", proxy.url())
    events = contract_events(6)
    before = len(proxy.seen())

    outcomes, bodies, port = deliver_over_tls(trusted_ca, events, concurrency=2)

    assert outcomes == [DELIVERED] * 6
    assert len(bodies) == 6
    tunnels = wait_for(lambda: proxy.seen()[before:], "the proxy's CONNECT lines")
    assert set(tunnels) == {f"CONNECT 127.0.0.1:{port}"} and 1 <= len(tunnels) <= 2


def test_the_tunnel_verifies_the_destination_certificate_as_a_direct_connection_does(
        proxy: ProxyProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())

    outcomes, bodies, _ = deliver_over_tls(trustme.CA(), contract_events(1))  # a CA nobody trusts

    [outcome] = outcomes
    assert outcome.kind == "retry" and "CERTIFICATE_VERIFY_FAILED" in outcome.reason
    assert f"through proxy {proxy.url()}" in outcome.reason
    assert bodies == []


@pytest.mark.parametrize(("proxy_variable", "no_proxy_variable", "listed"), [
    ("HTTP_PROXY", "NO_PROXY", "127.0.0.1"), ("http_proxy", "no_proxy", "example.com, 127.0.0.1"),
    ("HTTP_PROXY", "NO_PROXY", "*")])
def test_a_host_no_proxy_lists_is_reached_directly(sink: HttpSink, monkeypatch: pytest.MonkeyPatch,
                                                    proxy_variable: str, no_proxy_variable: str, listed: str) -> None:
    monkeypatch.setenv(proxy_variable, closed_port_url())  # a proxy that is down: used, it would fail
    monkeypatch.setenv(no_proxy_variable, listed)

    assert deliver(sink.url, contract_events(2)) == [DELIVERED] * 2
    assert len(sink.requests) == 2


def test_an_http_proxy_is_not_used_for_https_and_the_other_way_round(
        sink: HttpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", closed_port_url())

    assert deliver(sink.url, contract_events(1)) == [DELIVERED]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_credentials_are_sent_as_proxy_authorization(
        auth_proxy: ProxyProcess, sink: HttpSink, trusted_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch,
        scheme: str) -> None:
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", auth_proxy.url(f"{USER}:{PASSWORD}@"))

    if scheme == "http":
        assert deliver(sink.url, contract_events(3)) == [DELIVERED] * 3
        assert len(sink.requests) == 3
    else:
        outcomes, bodies, _ = deliver_over_tls(trusted_ca, contract_events(3))
        assert (outcomes, len(bodies)) == ([DELIVERED] * 3, 3)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_refusing_the_credentials_is_a_retry_that_names_the_proxy_and_not_the_password(
        auth_proxy: ProxyProcess, sink: HttpSink, trusted_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch,
        scheme: str) -> None:
    monkeypatch.setenv(f"{scheme}_proxy", auth_proxy.url(f"{USER}:wrong-{PASSWORD}@"))

    if scheme == "http":
        [outcome] = deliver(sink.url, contract_events(1))
        assert outcome.reason == f"connection error (ConnectError: proxy {auth_proxy.url()} answered HTTP 407 " \
                                 "(proxy authentication required))"
        assert sink.requests == []
    else:
        [outcome], bodies, port = deliver_over_tls(trusted_ca, contract_events(1))
        assert outcome.reason.startswith(f"connection error (ConnectError: proxy {auth_proxy.url()} refused "
                                         f"CONNECT 127.0.0.1:{port}: HTTP/1.1 407")
        assert bodies == []
    assert outcome.kind == "retry" and PASSWORD not in outcome.reason and USER not in outcome.reason


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_is_down_is_a_retry_naming_the_proxy(sink: HttpSink, monkeypatch: pytest.MonkeyPatch,
                                                          scheme: str) -> None:
    down = closed_port_url()
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", down.replace("http://", f"http://{USER}:{PASSWORD}@"))
    url = sink.url if scheme == "http" else sink.url.replace("http://", "https://")

    [outcome] = deliver(url, contract_events(1))

    assert outcome.kind == "retry"
    assert outcome.reason.startswith(f"connection error (ConnectError: proxy {down} unreachable: ")
    assert PASSWORD not in outcome.reason and USER not in outcome.reason
    assert sink.requests == []


def test_the_choice_is_logged_once_at_start_without_credentials(
        proxy: ProxyProcess, sink: HttpSink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url(f"{USER}:{PASSWORD}@"))
    caplog.set_level(logging.INFO, logger="trackrelay.destinations.http")

    deliver(sink.url, contract_events(3))

    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=proxy")]
    authority = sink.url.removeprefix("http://")
    assert line == f"event=proxy origin=http://{authority} proxy={proxy.url()} tunnel=no auth=basic"


@pytest.mark.parametrize("value", ["socks5://ann:s3cret-pw@127.0.0.1:1080", "https://ann:s3cret-pw@proxy.example"])
def test_a_proxy_that_is_not_plain_http_fails_at_start_without_its_credentials(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", value)

    with pytest.raises(ValueError, match="only http:// proxies") as raised:
        environment_proxy("http", "127.0.0.1", 80)
    assert PASSWORD not in str(raised.value) and USER not in str(raised.value)


def test_a_proxy_url_without_a_scheme_or_port_is_plain_http_on_port_80() -> None:
    assert Proxy.from_url("proxy.internal") == Proxy("proxy.internal", 80, "http://proxy.internal:80")
    assert Proxy.from_url("http://a%40b:p%3Aw@[::1]:3128").authorization == "Basic YUBiOnA6dw=="  # a@b:p:w


def test_a_proxy_that_never_answers_connect_is_a_connect_timeout_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:  # listening, never accepting: the kernel completes the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        proxy_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)

        [outcome] = deliver("https://127.0.0.1:9/in", contract_events(1), timeout_seconds=0.3)

    assert (outcome.kind, outcome.reason) == ("retry", f"timed out (ConnectTimeout: through proxy {proxy_url})")
