from __future__ import annotations

import asyncio

from pipeline.destinations.contract import contract_events
from pipeline.destinations.null import NullDestination
from pipeline.destinations.registry import destination_type


def test_null_destination_is_registered_and_delivers_every_event() -> None:
    assert destination_type("null") is NullDestination
    destination = NullDestination("void", NullDestination.Options(), 500)
    events = contract_events(7)
    outcomes = asyncio.run(destination.deliver(events))
    assert [o.kind for o in outcomes] == ["delivered"] * 7
