"""Fixtures of the browser tests: the npm-installed SDKs, one Chromium for the session, loopback
static servers (each its own origin), the webhook sink and ``trackrelay run`` processes.

Chromium or npm missing is a failure, never a skip. Every wait is bounded.

Everything here is package-scoped: shared by the browser tests, and gone before the next test
outside them. That matters for Chromium: while Playwright's sync API is started, its event loop
counts as running on the main thread, and every later ``asyncio.run()`` there would fail.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from http_sink import HttpSink
from pipeline_harness import webhook

from .arrivals import Arrivals
from .network import BrowserPage
from .sdks import copy_segment_bundle, install_sdks
from .servers import LIMITED_KEY, LOCKED_KEY, WEB_KEYS, Relay, StaticServer

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="package")
def sdk_modules(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_modules holding the pinned SDKs, in the pytest cache (installed once per version;
    under ``-p no:cacheprovider``, in the run's tmp folder)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("browser-sdks") if cache is not None else tmp_path_factory.mktemp("browser-sdks")
    return install_sdks(folder)


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("the browser tests need chromium on PATH (apt-get install chromium)")
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        yield launched
        launched.close()
    finally:
        playwright.stop()


@pytest.fixture
def browser_page(browser: Browser, tmp_path: Path) -> Iterator[BrowserPage]:
    """A fresh context and page; its screenshot is kept in the test's tmp folder."""
    page = BrowserPage(browser.new_context())
    yield page
    try:
        page.page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    finally:
        page.close()


@pytest.fixture(scope="package")
def site(sdk_modules: Path) -> Iterator[StaticServer]:
    """The static server of the test pages: the origin every test page runs on."""
    server = StaticServer(sdk_modules)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def elsewhere(sdk_modules: Path) -> Iterator[StaticServer]:
    """A second static server: another origin, which no source allows."""
    server = StaticServer(sdk_modules)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def sink() -> Iterator[HttpSink]:
    recording = HttpSink()
    yield recording
    recording.stop()


@pytest.fixture
def arrivals(sink: HttpSink) -> Arrivals:
    return Arrivals(sink)


@pytest.fixture(scope="package")
def relay(tmp_path_factory: pytest.TempPathFactory, sink: HttpSink) -> Iterator[Relay]:
    """trackrelay with only the settings every release has: sources with write keys."""
    server = Relay(tmp_path_factory.mktemp("relay"), [webhook(f"{sink.url}/hook", batch_size=1)],
                   [{"name": "web", "write_keys": WEB_KEYS}])
    yield server
    server.stop()


@pytest.fixture(scope="package")
def full_relay(tmp_path_factory: pytest.TempPathFactory, sink: HttpSink, sdk_modules: Path,
               site: StaticServer) -> Iterator[Relay]:
    """trackrelay serving the first-party Segment bundle, with an origin-locked and a rate-limited
    source besides the plain one."""
    directory = tmp_path_factory.mktemp("full-relay")
    bundle = copy_segment_bundle(sdk_modules, directory / "sdk")
    sources = [{"name": "web", "write_keys": WEB_KEYS},
               {"name": "locked", "write_keys": [LOCKED_KEY], "allowed_origins": [site.origin]},
               {"name": "limited", "write_keys": [LIMITED_KEY], "rate_limit_per_second": 2, "rate_limit_burst": 3}]
    server = Relay(directory, [webhook(f"{sink.url}/hook", batch_size=1)], sources,
                   receiver={"browser_sdk_dir": str(bundle)}, public_url=True)
    yield server
    server.stop()
