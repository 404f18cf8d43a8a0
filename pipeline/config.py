"""Typed configuration, read once at start-up and passed down.

Precedence for every setting: command-line flag, then ``TRACKRELAY_<SECTION>_<KEY>`` in the
environment, then the TOML file (``--config`` or ``TRACKRELAY_CONFIG``), then the default.
A bad value fails with :class:`ConfigError` naming the key and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TRACKRELAY_"


class ConfigError(Exception):
    """A configuration value is missing, unknown or of the wrong shape."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///trackrelay.db"
    # FULL fsyncs the WAL at every commit: a 200 survives power loss. NORMAL survives a crash of
    # the process but may lose the last commits on power loss; it is faster on slow disks.
    sqlite_synchronous: str = "FULL"
    # How long a write waits for a lock (SQLite) or a connection (Postgres) before the request
    # is answered 503 with Retry-After.
    lock_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class ReceiverConfig:
    host: str = "127.0.0.1"
    port: int = 8088
    processes: int = 1
    max_call_bytes: int = 15360
    max_batch_bytes: int = 512000
    max_message_bytes: int = 15360
    # A body over its limit is read and thrown away up to this many bytes so that the client
    # reads our 413 instead of a connection reset; past it the connection is closed.
    discard_cap_bytes: int = 16 * 1024 * 1024
    # 207 as the spec says; 200 for SDKs that resend any non-200 (rudder-sdk-python, and
    # segment-analytics-python before 2.4). The body is the same either way.
    partial_success_status: int = 207
    # Empty: "Access-Control-Allow-Origin: *". Otherwise only these origins are echoed back.
    cors_origins: tuple[str, ...] = ()
    # Group commit: at most this many rows share one transaction.
    commit_max_rows: int = 500
    retry_after_seconds: int = 5
    # Where to record refused input for operators; raw input is cut to this many bytes.
    rejected_raw_bytes: int = 2048
    # Behind a proxy: take the client address from X-Forwarded-For / X-Real-Ip.
    trust_forwarded_headers: bool = False


@dataclass(frozen=True)
class SourceConfig:
    name: str
    write_keys: tuple[str, ...]
    destinations: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    sources: tuple[SourceConfig, ...] = ()
    log_level: str = "INFO"

    @property
    def open_mode(self) -> bool:
        """No sources configured: every request is accepted, write key optional."""
        return not self.sources


SECTIONS: dict[str, type] = {"database": DatabaseConfig, "receiver": ReceiverConfig}
_CHOICES = {
    ("database", "sqlite_synchronous"): {"FULL", "NORMAL", "EXTRA", "OFF"},
    ("receiver", "partial_success_status"): {200, 207},
}


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _convert(where: str, raw: Any, hint: Any, from_env: bool) -> Any:
    """Coerce one value to the field's type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if from_env and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
        return tuple(raw)
    if hint is bool:
        if from_env and isinstance(raw, str):
            low = raw.lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if hint is int or hint is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected a number, got {raw!r}")
        try:
            value = hint(raw) if from_env or isinstance(raw, (int, float)) else None
        except ValueError:
            value = None
        if value is None or (hint is int and isinstance(raw, float) and raw != int(raw)):
            raise ConfigError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {raw!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {raw!r}")
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: expected a string, got {raw!r}")
    return raw


def _build_section(name: str, cls: type, table: Mapping[str, Any], env: Mapping[str, str],
                   overrides: Mapping[str, Any]) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}]: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"[{name}] {key}: unknown key (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key in known:
        where = f"[{name}] {key}"
        if overrides.get(key) is not None:
            value = _convert(f"--{key.replace('_', '-')}", overrides[key], hints[key], True)
        elif env_name(name, key) in env:
            value = _convert(env_name(name, key), env[env_name(name, key)], hints[key], True)
        elif key in table:
            value = _convert(where, table[key], hints[key], False)
        else:
            continue
        if isinstance(value, str) and (name, key) in _CHOICES:
            value = value.upper()
        choices = _CHOICES.get((name, key))
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}: must be one of {sorted(choices)}, got {value!r}")
        values[key] = value
    return cls(**values)


def _build_sources(raw: Any) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError("[[sources]]: expected an array of tables")
    sources, seen_names, seen_keys = [], set(), set()
    for i, table in enumerate(raw):
        where = f"[[sources]] #{i + 1}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(table) - {"name", "write_keys", "destinations"}
        if unknown:
            raise ConfigError(f"{where} {sorted(unknown)[0]}: unknown key (known: destinations, name, write_keys)")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where} name: required, a non-empty string")
        if name in seen_names:
            raise ConfigError(f"{where} name: {name!r} is used twice")
        keys = _convert(f"{where} write_keys", table.get("write_keys", []), tuple[str, ...], False)
        if not keys or any(not k for k in keys):
            raise ConfigError(f"{where} write_keys: at least one non-empty key is required")
        for key in keys:
            if key in seen_keys:
                # Never echo a credential: name the source, not the key.
                raise ConfigError(f"{where} write_keys: a key of source {name!r} is used by another source")
            seen_keys.add(key)
        dests = table.get("destinations")
        if dests is not None:
            dests = _convert(f"{where} destinations", dests, tuple[str, ...], False)
        seen_names.add(name)
        sources.append(SourceConfig(name=name, write_keys=keys, destinations=dests))
    return tuple(sources)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read the file (if any), apply the environment and the flags, and validate everything."""
    env = os.environ if env is None else env
    overrides = overrides or {}
    path = path or env.get(f"{ENV_PREFIX}CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot be read ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML ({exc})") from None
    allowed = set(SECTIONS) | {"sources", "log_level"}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(allowed))})")
    sections = {
        name: _build_section(name, cls, data.get(name, {}), env, overrides.get(name, {}))
        for name, cls in SECTIONS.items()
    }
    log_level = overrides.get("", {}).get("log_level") or env.get(f"{ENV_PREFIX}LOG_LEVEL") \
        or data.get("log_level", "INFO")
    if not isinstance(log_level, str) or log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    config = Config(sources=_build_sources(data.get("sources", [])), log_level=log_level.upper(), **sections)
    _check_limits(config.receiver)
    return config


def _check_limits(receiver: ReceiverConfig) -> None:
    if receiver.processes < 1:
        raise ConfigError("[receiver] processes: must be at least 1")
    for key in ("max_call_bytes", "max_batch_bytes", "max_message_bytes", "commit_max_rows"):
        if getattr(receiver, key) < 1:
            raise ConfigError(f"[receiver] {key}: must be at least 1")
    if receiver.discard_cap_bytes < max(receiver.max_call_bytes, receiver.max_batch_bytes):
        raise ConfigError("[receiver] discard_cap_bytes: must be at least the largest request limit")


def settings_help() -> str:
    """Every setting with its environment variable and default, for ``--help``."""
    lines = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  [{name}] {f.name:<24} {env_name(name, f.name):<44} default {default!r}")
    lines.append(f"  log_level{'':<24} {ENV_PREFIX + 'LOG_LEVEL':<44} default 'INFO'")
    return "\n".join(lines)
