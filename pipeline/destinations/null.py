"""A destination that accepts and discards every event: for benchmarks and dry runs."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.destinations.base import DELIVERED, Destination, Event, Outcome


class NullDestination(Destination):
    default_batch_size = 500

    @property
    def takes_stored_json(self) -> bool:
        return True  # it does not look at the events at all

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        return [DELIVERED] * len(events)
