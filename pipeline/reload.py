"""Reloading ``[[sources]]`` and ``[[destinations]]`` on SIGHUP, from the same file, environment
and flags as at start.

The new file is validated as a whole first (the same :func:`load_config` as at start-up); a
bad one keeps the running configuration and says why in one line. Only sources and
destinations change in a running process: any other setting that differs is logged as needing
a restart and keeps its running value.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, ConfigError, load_config

log = logging.getLogger("trackrelay.reload")

RELOADABLE = ("sources", "destinations")


@dataclass(frozen=True)
class ConfigSource:
    """Where the running configuration came from: read again, it gives the same result unless
    the file changed. The environment is a copy taken at start (a reload never sees variables
    set later, as a restart would not either)."""

    path: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def load(self) -> Config:
        return load_config(self.path, self.env, self.overrides)


def needing_restart(running: Config, loaded: Config) -> list[str]:
    """Settings other than sources and destinations that differ, as ``section.key``."""
    changed = []
    for f in dataclasses.fields(Config):
        if f.name in RELOADABLE:
            continue
        old, new = getattr(running, f.name), getattr(loaded, f.name)
        if old == new:
            continue
        if dataclasses.is_dataclass(old):
            changed += [f"{f.name}.{g.name}" for g in dataclasses.fields(old)
                        if getattr(old, g.name) != getattr(new, g.name)]
        else:
            changed.append(f.name)
    return changed


def reloaded(source: ConfigSource, running: Config, role: str) -> Config | None:
    """The running configuration with the file's sources and destinations, or None (logged)
    if the file is not valid now."""
    try:
        loaded = source.load()
    except ConfigError as exc:
        # ConfigError names keys and kinds, never a value (a write key or a token may be one).
        log.error("event=reload_refused role=%s reason=%r action=kept_running_config", role, str(exc)[:500])
        return None
    except Exception as exc:  # an adapter's own check that failed some other way
        log.error("event=reload_refused role=%s reason=%r action=kept_running_config", role,
                  f"{type(exc).__name__} while validating the config file")
        return None
    restart = needing_restart(running, loaded)
    if restart:
        log.warning("event=reload_needs_restart role=%s settings=%s detail='changed in the file, kept as they "
                    "were: only [[sources]] and [[destinations]] reload'", role, ",".join(restart))
    config = dataclasses.replace(running, sources=loaded.sources, destinations=loaded.destinations)
    log.info("event=reloaded role=%s sources=%s destinations=%s", role, _diff(running.sources, config.sources),
             _diff(running.destinations, config.destinations))
    return config


def _diff(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    """``+added,-removed,~changed`` by name ("unchanged" if none)."""
    before, after = {x.name: x for x in old}, {x.name: x for x in new}
    parts = [f"+{n}" for n in after if n not in before] + [f"-{n}" for n in before if n not in after]
    parts += [f"~{n}" for n in after if n in before and before[n] != after[n]]
    return ",".join(parts) or "unchanged"
