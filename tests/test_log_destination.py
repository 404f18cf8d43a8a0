"""The log destination: one line per event, at the configured level."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pipeline.destinations.base import DELIVERED
from pipeline.destinations.log import LogDestination, LogOptions


def track(n: int) -> dict[str, Any]:
    return {"type": "track", "messageId": f"m{n}", "userId": "u1", "event": "Signed Up",
            "properties": {"n": n, "text": "é"}}


def test_each_event_is_one_line_with_its_compact_json(caplog: pytest.LogCaptureFixture) -> None:
    destination = LogDestination("console", LogOptions(), 100)
    with caplog.at_level(logging.INFO, logger="trackrelay.destination.console"):
        assert asyncio.run(destination.deliver([track(1), track(2)])) == [DELIVERED, DELIVERED]
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("trackrelay.destination.console", logging.INFO,
         'event=delivered destination=console type=track messageId=m1 payload='
         '{"type":"track","messageId":"m1","userId":"u1","event":"Signed Up","properties":{"n":1,"text":"é"}}'),
        ("trackrelay.destination.console", logging.INFO,
         'event=delivered destination=console type=track messageId=m2 payload='
         '{"type":"track","messageId":"m2","userId":"u1","event":"Signed Up","properties":{"n":2,"text":"é"}}'),
    ]


def test_level_sets_the_records_level(caplog: pytest.LogCaptureFixture) -> None:
    destination = LogDestination("quiet", LogOptions(level="debug"), 100)
    with caplog.at_level(logging.DEBUG, logger="trackrelay.destination.quiet"):
        asyncio.run(destination.deliver([track(1)]))
    assert [(r.name, r.levelname) for r in caplog.records] == [("trackrelay.destination.quiet", "DEBUG")]


def test_events_below_the_loggers_level_are_still_delivered(caplog: pytest.LogCaptureFixture) -> None:
    destination = LogDestination("quiet", LogOptions(level="DEBUG"), 100)
    with caplog.at_level(logging.INFO, logger="trackrelay.destination.quiet"):
        assert asyncio.run(destination.deliver([track(1)])) == [DELIVERED]
    assert caplog.records == []


def test_an_event_that_is_not_json_is_rejected_alone(caplog: pytest.LogCaptureFixture) -> None:
    destination = LogDestination("console", LogOptions(level="WARNING"), 100)
    bad = {**track(2), "properties": {"n": 2**70}}
    with caplog.at_level(logging.INFO, logger="trackrelay.destination.console"):
        outcomes = asyncio.run(destination.deliver([track(1), bad, track(3)]))
    assert [(o.kind, o.reason) for o in outcomes] == [
        ("delivered", ""), ("rejected", "cannot serialise event as JSON: Integer exceeds 64-bit range"),
        ("delivered", "")]
    assert [r.getMessage().split(" payload=")[0] for r in caplog.records] == [
        "event=delivered destination=console type=track messageId=m1",
        "event=delivered destination=console type=track messageId=m3"]
    assert {r.levelname for r in caplog.records} == {"WARNING"}


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        LogDestination("console", LogOptions(level="LOUD"), 100)
    assert str(info.value) == "log destination 'console' level: 'LOUD' is not one of DEBUG, INFO, WARNING"
