"""The ``log`` destination: one log line per event, for trying trackrelay out.

Each event is logged by ``trackrelay.destination.<name>`` at the configured level as
``event=delivered destination=<name> type=<type> messageId=<id> payload=<compact JSON>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from pipeline.destinations.base import DELIVERED, Destination, Event, Outcome, rejected

LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING}


@dataclass(frozen=True)
class LogOptions:
    level: str = "INFO"


class LogDestination(Destination):
    Options = LogOptions
    default_batch_size = 100

    def __init__(self, name: str, options: LogOptions, batch_size: int) -> None:
        super().__init__(name, options, batch_size)
        level = LEVELS.get(options.level.upper())
        if level is None:
            raise ValueError(f"log destination {name!r} level: {options.level!r} is not one of "
                             f"{', '.join(LEVELS)}")
        self.level = level
        self.log = logging.getLogger(f"trackrelay.destination.{name}")

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        outcomes = []
        for event in events:
            try:
                payload = orjson.dumps(event).decode()
            except TypeError as exc:
                outcomes.append(rejected(f"cannot serialise event as JSON: {exc}"))
                continue
            self.log.log(self.level, "event=delivered destination=%s type=%s messageId=%s payload=%s",
                         self.name, event.get("type"), event.get("messageId"), payload)
            outcomes.append(DELIVERED)
        return outcomes
