"""Write keys to sources: which key a message carries, and which source it belongs to."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from pipeline.config import SourceConfig

OPEN_SOURCE = "default"


def message_write_key(message: Any, override_key: str | None, batch_key: str | None,
                      auth_key: str | None) -> str | None:
    """A message's write key, most specific first.

    The webhook ``?writeKey=`` overrides everything; then the message's own ``writeKey``; then
    the batch body's; then the HTTP Basic username. Real clients differ (analytics-python 2.3
    sends only the body key, rudder-sdk-node only Basic auth), so every place counts.
    """
    if override_key:
        return override_key
    own = message.get("writeKey") if isinstance(message, dict) else None
    if isinstance(own, str) and own:
        return own
    return batch_key or auth_key or None


class SourceRegistry:
    """Configured sources by write key. With none configured (open mode) all keys are welcome."""

    def __init__(self, sources: Sequence[SourceConfig]) -> None:
        self._keys = [(key.encode("utf-8"), source.name) for source in sources for key in source.write_keys]
        self._open = not sources

    @property
    def open_mode(self) -> bool:
        return self._open

    def source_for(self, key: str | None) -> str | None:
        """The source name for ``key``; None when closed mode does not know it."""
        if self.open_mode:
            return OPEN_SOURCE
        if not key:
            return None
        candidate = key.encode("utf-8", "replace")
        found = None
        # Compare against every key in constant time and never stop early, so the time taken
        # tells nothing about how much of a key was right.
        for known, name in self._keys:
            if hmac.compare_digest(known, candidate):
                found = name
        return found
