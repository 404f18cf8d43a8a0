"""Adapter types by name, from the ``trackrelay.destinations`` entry point group.

Built-ins are registered in trackrelay's own pyproject.toml exactly like a third-party
package would register its own; an unknown name fails at start-up naming the installed ones.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from pipeline.destinations.base import Destination

GROUP = "trackrelay.destinations"


class UnknownDestinationType(LookupError):
    pass


def installed_types() -> dict[str, type[Destination]]:
    """Every installed adapter class by type name (loads each entry point)."""
    found: dict[str, type[Destination]] = {}
    for entry in entry_points(group=GROUP):
        found.setdefault(entry.name, entry.load())
    return found


def destination_type(name: str) -> type[Destination]:
    for entry in entry_points(group=GROUP):
        if entry.name == name:
            cls = entry.load()
            if not (isinstance(cls, type) and issubclass(cls, Destination)):
                raise UnknownDestinationType(f"entry point {name!r} is {cls!r}, not a Destination subclass")
            return cls
    names = sorted({entry.name for entry in entry_points(group=GROUP)})
    raise UnknownDestinationType(f"unknown destination type {name!r} (installed: {', '.join(names) or 'none'})")
