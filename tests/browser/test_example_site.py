"""``deploy/example-site/index.html`` as a user runs it, with only its two settings filled in: it
loads analytics.js from trackrelay with the snippet, sends a page, and its buttons send a track
and an identify, each delivered once. Its screenshot is kept in the test's tmp folder (and, with
``UPDATE_SCREENSHOTS=1``, copied to ``screenshots/``, the one committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config

from .arrivals import Arrivals, assert_browser_context
from .network import BrowserPage
from .servers import Relay, StaticServer

pytestmark = pytest.mark.browser
EXAMPLE = Path(__file__).parents[2] / "deploy" / "example-site" / "index.html"
SCREENSHOT = Path(__file__).parent / "screenshots" / "example-site.png"  # renamed -<width>.png
WRITE_KEY = "example-key"
EMAIL = "example-user@example.com"
WAIT_MS = 15_000


def filled_in(relay: Relay) -> str:
    """The page with the two lines its README says to change, changed."""
    text = EXAMPLE.read_text(encoding="utf-8")
    settings = {'const TRACKRELAY = "http://127.0.0.1:8088";': f'const TRACKRELAY = "{relay.url}";',
                'const WRITE_KEY = "YOUR_WRITE_KEY";': f'const WRITE_KEY = "{WRITE_KEY}";'}
    for line, replacement in settings.items():
        assert text.count(line) == 1, f"{EXAMPLE} no longer has the line {line!r} once"
        text = text.replace(line, replacement)
    return text


@pytest.mark.parametrize("width", [375, 1280])  # a phone (the log card once covered "Sign in") and a desktop
def test_example_site_sends_page_track_and_identify(browser_page: BrowserPage, site: StaticServer,
                                                    full_relay: Relay, arrivals: Arrivals, tmp_path: Path,
                                                    width: int) -> None:
    url = site.page("example-site.html", filled_in(full_relay))
    page = browser_page.page
    page.set_viewport_size({"width": width, "height": 800})
    browser_page.goto(url)
    try:
        page.wait_for_function("window.analytics && window.analytics.initialized === true", timeout=WAIT_MS)
        page.locator('#log li[data-type="page"]').wait_for(timeout=WAIT_MS)
        page.click("#add-to-cart")
        page.locator('#log li[data-type="track"] .status.ok').wait_for(timeout=WAIT_MS)
        page.fill("#email", EMAIL)
        page.click("#identify")
        page.locator('#log li[data-type="identify"] .status.ok').wait_for(timeout=WAIT_MS)
    except Exception as exc:
        raise AssertionError(f"the example site did not work: {exc}\n{browser_page.report()}") from exc
    ids = page.eval_on_selector_all("#log li", "items => items.map(i => [i.dataset.type, i.dataset.messageId])")
    assert sorted(t for t, _ in ids) == ["identify", "page", "track"], f"{ids}\n{browser_page.report()}"
    delivered = arrivals.exactly_once(browser_page, [i for _, i in ids], full_relay.url)
    for event in delivered.values():
        assert_browser_context(event, url, "analytics.js")
    by_type = {e["type"]: e for e in delivered.values()}
    assert by_type["track"]["event"] == "Product Added" and by_type["track"]["properties"]["price"] == 14.5
    assert by_type["identify"]["userId"] == EMAIL and by_type["identify"]["traits"] == {"email": EMAIL}
    browser_page.assert_only_to(site.origin, full_relay.url)
    shot = tmp_path / f"example-site-{width}.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS"):  # the committed copies, renewed on request only
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT.with_name(f"example-site-{width}.png"))


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's trackrelay.toml loads, run from its folder with the SDK copied to ``sdk``."""
    shutil.copyfile(EXAMPLE.with_name("trackrelay.toml"), tmp_path / "trackrelay.toml")
    (tmp_path / "sdk").mkdir()
    (tmp_path / "sdk" / "standalone.js").write_text("", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "trackrelay.toml", env={})
    assert config.receiver.browser_sdk_dir == "sdk" and config.receiver.port == 8088
    assert [s.write_keys for s in config.sources] == [("YOUR_WRITE_KEY",)]
