"""The destination adapter contract: deliver a batch of events, answer for each one.

An adapter is a small class. ``deliver(events)`` receives normalised events (dicts, the JSON
delivered downstream; :data:`StoredJson` for an adapter that ``takes_stored_json``) and
returns one :class:`Outcome` per event, in order:

- ``DELIVERED``: the destination has it; never offered again.
- ``retry(reason, after=None)``: a temporary failure; offered again after the backoff (or
  after ``after`` seconds when the destination said so, e.g. ``Retry-After``).
- ``rejected(reason)``: the destination refused it for good; it is dead at once.

An adapter that only writes each event out as JSON, with ``orjson.dumps``, may say so with
``takes_stored_json``: it is then handed each event as the JSON the worker stored, an
``orjson.Fragment`` that ``orjson.dumps`` writes out byte for byte, and the worker does not
parse what it would only serialise again (the same bytes: the stored JSON is ``orjson.dumps``
of the normalised event).

An exception from ``deliver`` counts as ``retry`` for every event of the batch. ``start()``
runs once before the first delivery and ``close()`` once at shutdown; ``check()`` is an
optional health check that returns None when healthy, or a description of the problem.
Adapters are found through the ``trackrelay.destinations`` entry point group; built-ins are
registered the same way as third-party packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

Event = dict[str, Any]
# An event as the worker stored it (see takes_stored_json): orjson.dumps writes it out as it is.
StoredJson = orjson.Fragment


@dataclass(frozen=True)
class Outcome:
    kind: str  # "delivered" | "retry" | "rejected"
    reason: str = ""
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.kind == "delivered"


DELIVERED = Outcome("delivered")


def retry(reason: str, after: float | None = None) -> Outcome:
    return Outcome("retry", reason, after)


def rejected(reason: str) -> Outcome:
    return Outcome("rejected", reason)


@dataclass(frozen=True)
class NoOptions:
    """For adapters that take no settings of their own."""


def inherits(adapter: object, cls: type, *methods: str) -> bool:
    """Whether ``adapter``'s class takes each of ``methods`` from ``cls`` unchanged."""
    kind = type(adapter)
    return all(getattr(kind, name) is getattr(cls, name) for name in methods)


class Destination:
    """Base class of every adapter. Subclasses set ``Options`` (a frozen dataclass of their
    own settings, validated at start-up like the rest of the configuration) and implement
    ``deliver``."""

    Options: ClassVar[type] = NoOptions
    # How many events one deliver() call receives unless the destination's config says otherwise.
    default_batch_size: ClassVar[int] = 100

    @property
    def takes_stored_json(self) -> bool:
        """True when ``deliver`` does nothing with an event but ``orjson.dumps`` it (or
        nothing at all): it is handed :data:`StoredJson` events, never parsed. A built-in that
        says so says it only for itself: a subclass that overrides any of its methods that
        see the events gets dicts again (see :func:`inherits`)."""
        return False

    def __init__(self, name: str, options: Any, batch_size: int) -> None:
        self.name = name
        self.options = options
        self.batch_size = batch_size

    @property
    def parallelism(self) -> int:
        """How many deliver() calls this adapter can usefully have in flight at once (an HTTP
        adapter's connection count); the worker claims enough to keep them all busy."""
        return 1

    @property
    def max_parallelism(self) -> int:
        """The most :attr:`parallelism` can become (an adaptive limit's ceiling)."""
        return self.parallelism

    def pause_seconds(self) -> float:
        """How long the destination asked for nothing more to be sent (``Retry-After``): the
        worker claims nothing for it until then."""
        return 0.0

    def concurrency_snapshot(self) -> Any:
        """The adapter's concurrency controller as a
        :class:`pipeline.destinations.concurrency.Snapshot`, or None (not an HTTP adapter)."""
        return None

    async def start(self) -> None:
        """Open connections, files, pools. Called once before the first ``deliver``."""

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what ``start`` opened. Called once; ``deliver`` is not called after it."""

    async def check(self) -> str | None:
        """None when the destination looks healthy, else a short description of the problem."""
        return None
