"""Destination adapters and the registry that finds them through entry points."""

from pipeline.destinations.base import DELIVERED, Destination, Event, Outcome, StoredJson, rejected, retry

__all__ = ["DELIVERED", "Destination", "Event", "Outcome", "StoredJson", "rejected", "retry"]
