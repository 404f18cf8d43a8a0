"""The operator console in Debian's Chromium: log in, watch events arrive in the live view
while the test sends them, let a destination fail (its sink answers 500) until its deliveries
are dead, find them on the failures page, bring the sink back, replay everything the filter
matches, and see them delivered at the sink and counted on the overview.

Every page is photographed at 1280 and 375 pixels wide into the test's tmp folder; with
``UPDATE_SCREENSHOTS=1`` they are copied to ``screenshots/`` and the overview and failures
pages to ``docs/`` (the ones the README shows)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from console_harness import RunningConsole, with_console
from http_sink import Answer, HttpSink
from pipeline_harness import Pipeline, Pipelines, ScriptedSink, wait_for, webhook

pytestmark = pytest.mark.browser

TOKEN = "console-browser-token"
HERE = Path(__file__).parent
WIDTHS = (1280, 375)


@pytest.fixture
def failing() -> Iterator[ScriptedSink]:
    scripted = ScriptedSink(HttpSink())
    scripted.broken = True  # type: ignore[attr-defined]
    scripted.decide = lambda n, r: Answer(500, b"crm is down") if r.path == "/crm" and scripted.broken \
        else Answer()  # type: ignore[attr-defined]
    yield scripted
    scripted.sink.stop()


@pytest.fixture
def pipeline(sqlite_url: str, tmp_path: Path, failing: ScriptedSink) -> Iterator[Pipeline]:
    pipelines = Pipelines(sqlite_url, tmp_path)
    yield pipelines.start([webhook(failing.url + "/warehouse", name="warehouse"),
                           webhook(failing.url + "/crm", name="crm", max_attempts=2)])
    pipelines.stop_all()


@pytest.fixture
def console(pipeline: Pipeline) -> Iterator[RunningConsole]:
    running = RunningConsole(with_console(pipeline.config, token=TOKEN), poll_seconds=0.2)
    yield running
    running.stop()


def photograph(page: Page, folder: Path, name: str) -> None:
    """The page at each width, whole; the viewport put back to the first width."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(150)
        path = folder / f"console-{name}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000, f"{path.name} is nearly empty"
        if os.environ.get("UPDATE_SCREENSHOTS"):
            shutil.copy(path, HERE / "screenshots" / path.name)
            if name in ("overview", "failures") and width == 1280:
                shutil.copy(path, HERE.parent.parent / "docs" / f"console-{name}.png")
    page.set_viewport_size({"width": WIDTHS[0], "height": 900})


def test_an_operator_finds_dead_deliveries_and_replays_them(browser: Browser, pipeline: Pipeline,
                                                             console: RunningConsole, failing: ScriptedSink,
                                                             tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": WIDTHS[0], "height": 900})
    errors: list[str] = []
    page = context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(console.url + "/live")
        expect(page).to_have_url(console.url + "/login?next=%2Flive")
        photograph(page, tmp_path, "login")
        page.get_by_label("Admin token").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_contain_text("not the admin token")
        page.get_by_label("Admin token").fill(TOKEN)
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(console.url + "/live")
        errors.clear()  # the wrong token's 401 page is the one error expected
        expect(page.locator("#live-status")).to_contain_text("Watching")

        sent = [str(uuid.uuid4()) for _ in range(3)]
        for n, message_id in enumerate(sent):
            answer = pipeline.receiver.post("/v1/track", {"userId": f"user-{n}", "event": "Order Completed",
                                                          "messageId": message_id, "properties": {"total": 42}})
            assert answer.status_code == 200
        items = page.locator("#live-list > li")
        expect(items).to_have_count(3, timeout=20_000)
        expect(page.locator("#live-list .badge-dead")).to_have_count(3, timeout=20_000)
        expect(page.locator("#live-list .badge-delivered")).to_have_count(3)
        items.first.locator("summary").click()
        expect(items.first.locator("pre")).to_contain_text(sent[-1])
        photograph(page, tmp_path, "live")

        page.get_by_role("link", name="Failures").click()
        rows = page.locator("table.deliveries tbody tr")
        expect(rows).to_have_count(3)
        expect(rows.first).to_contain_text("crm is down")
        photograph(page, tmp_path, "failures")

        page.get_by_role("link", name=f"track: Order Completed").first.click()
        expect(page.locator("h1")).to_have_text("track: Order Completed")
        expect(page.locator("pre.json").first).to_contain_text('"total": 42')
        photograph(page, tmp_path, "event")
        page.go_back()

        failing.broken = False  # type: ignore[attr-defined]
        page.get_by_label("Destination").select_option("crm")
        page.get_by_role("button", name="Filter").first.click()
        page.get_by_role("button", name="Replay everything this filter matches…").click()
        expect(page.locator("h1")).to_have_text("Replay 3 deliveries?")
        page.get_by_role("button", name="Replay 3").click()
        expect(page.get_by_role("status")).to_contain_text("Replayed 3 deliveries")
        wait_for(lambda: sorted(failing.counts("/crm")) == sorted(sent), "the three to reach the sink")
        assert failing.counts("/crm") == {message_id: 1 for message_id in sent}
        wait_for(lambda: pipeline.db.states("crm") == {"delivered": 3}, "the three to be delivered")

        page.get_by_role("link", name="Overview").click()
        card = page.locator("li.card", has=page.locator("h3", has_text="crm"))
        expect(card.locator("div", has=page.locator("dt", has_text="Dead")).locator("dd")).to_have_text("0")
        expect(card.locator("div", has=page.locator("dt", has_text="Delivered (1 h)")).locator("dd")).to_have_text("3")
        expect(page.locator(".legend")).to_contain_text("Accepted 3")
        photograph(page, tmp_path, "overview")

        # keyboard: the skip link is the first stop, then the navigation
        page.keyboard.press("Tab")
        expect(page.locator(":focus")).to_have_text("Skip to content")
        page.keyboard.press("Tab")
        expect(page.locator(":focus")).to_have_text("trackrelay")
        assert errors == []
    finally:
        context.close()
