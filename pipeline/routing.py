"""Which destinations receive an event: the source's list, Segment's integrations object,
and the destination's own filters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.config import DestinationConfig, SourceConfig


class Router:
    def __init__(self, destinations: Sequence[DestinationConfig], sources: Sequence[SourceConfig]) -> None:
        self._destinations = list(destinations)
        # Each source's candidates, worked out once rather than per event. A source that lists
        # none (and open mode, which has no sources) sends to every destination.
        self._by_source = {source.name: [d for d in self._destinations
                                         if source.destinations is None or d.name in source.destinations]
                           for source in sources}

    def destinations_for(self, source: str, event: dict[str, Any]) -> list[str]:
        candidates = self._by_source.get(source, self._destinations)
        integrations = event.get("integrations")
        if not isinstance(integrations, dict):
            integrations = {}
        return [d.name for d in candidates if enabled_by_integrations(d, integrations) and passes_filters(d, event)]


def enabled_by_integrations(dest: DestinationConfig, integrations: dict[str, Any]) -> bool:
    """Segment's rule: ``All`` defaults to true; a key naming the destination (its name or an
    alias) set to false excludes it, and true or an object includes it even when All is false."""
    for key in (dest.name, *dest.aliases):
        if key in integrations:
            return integrations[key] is not False
    return integrations.get("All", True) is not False


def passes_filters(dest: DestinationConfig, event: dict[str, Any]) -> bool:
    """``types`` limits message types; ``events`` limits track events by name (other types pass)."""
    kind = event.get("type")
    if dest.types and kind not in dest.types:
        return False
    if dest.events and kind == "track" and event.get("event") not in dest.events:
        return False
    return True
