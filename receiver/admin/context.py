"""What every console handler is given: the configuration (as it is now: SIGHUP may reload
it), a store of the console's own, and where the console's state lives."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.store import Store


@dataclass
class AdminContext:
    # A callable, not a Config: a reload replaces the receiver's configuration, and the
    # console must show the new one.
    current_config: Callable[[], Config]
    # Its own pool: a console query never takes a connection the receiver's commits need.
    store: Store
    started_at: float = field(default_factory=time.time)
    # The live events feed (receiver/admin/live.py), made when the console starts.
    live: Any = None

    @property
    def config(self) -> Config:
        return self.current_config()

    @classmethod
    def create(cls, current_config: Callable[[], Config]) -> AdminContext:
        return cls(current_config=current_config, store=Store.open(current_config().database))

    def close(self) -> None:
        self.store.dispose()
