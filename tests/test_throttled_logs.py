"""Repeated warnings are folded: at most one line a second per kind, saying how many it stands for."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.logs import Throttled


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_kind_is_logged_once_an_interval_with_the_count_folded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttled = Throttled(logging.getLogger("test.throttled"), interval=1.0, clock=clock)
    with caplog.at_level("WARNING", logger="test.throttled"):
        logged = [throttled.warning("outage", "event=store_unavailable n=%d", n) for n in range(5)]
        throttled.warning("other", "event=other")  # another kind is not held back
        clock.now += 1.0
        throttled.warning("outage", "event=store_unavailable n=%d", 5)
        clock.now += 5.0
        throttled.warning("outage", "event=store_unavailable n=%d", 6)
    assert logged == [True, False, False, False, False]
    assert [r.getMessage() for r in caplog.records] == [
        "event=store_unavailable n=0", "event=other", "event=store_unavailable n=5 folded=4",
        "event=store_unavailable n=6"]


def test_an_outage_logs_a_line_a_second_not_a_line_a_request(start_receiver, database_url: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from outage import store_down

    receiver = start_receiver(lock_timeout_seconds=0.2)
    started = time.monotonic()
    with store_down(database_url), caplog.at_level("WARNING", logger="trackrelay.receiver"):
        statuses = [receiver.post("/v1/track", {"userId": "u", "event": "e"}).status_code for _ in range(20)]
    seconds = time.monotonic() - started
    assert statuses == [503] * 20
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=store_unavailable")]
    assert 1 <= len(lines) <= seconds + 1, (seconds, lines)
    folded = sum(int(line.rsplit("folded=", 1)[1]) for line in lines if "folded=" in line)
    assert len(lines) + folded <= 20 and len(lines) < 20
