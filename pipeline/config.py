"""Typed configuration, read once at start-up and passed down.

Precedence for every setting: command-line flag, then ``TRACKRELAY_<SECTION>_<KEY>`` in the
environment, then the TOML file (``--config`` or ``TRACKRELAY_CONFIG``), then the default.
A bad value fails with :class:`ConfigError` naming the key and the problem.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.origins import OriginPattern, parse_pattern

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
    # Under load a commit waits up to this long for the requests already read and being judged
    # to join it (fewer, bigger commits: more requests a second). A request alone never waits.
    commit_gather_ms: float = 2.0
    # Sent as whole seconds (rounded up), as HTTP requires.
    retry_after_seconds: float = 5.0
    # Where to record refused input for operators; raw input is cut to this many bytes.
    rejected_raw_bytes: int = 2048
    # Behind a proxy: take the client address from X-Forwarded-For / X-Real-Ip (and the public
    # scheme and host from X-Forwarded-Proto / X-Forwarded-Host where public_url is not set).
    trust_forwarded_headers: bool = False
    # How browsers reach this receiver ("https://track.shop.example", optionally with a path
    # prefix): what the SDK settings and the first-party bundle point them at. Empty: taken
    # from each request's Host.
    public_url: str = ""
    # A request body must be whole within this many seconds of its headers, and arrive at least
    # this fast on average once the grace has passed (0: no minimum): else 408 (receiver/timeouts.py).
    body_timeout_seconds: float = 30.0
    body_min_rate_bytes: int = 1024
    body_rate_grace_seconds: float = 5.0
    # A keep-alive connection with no request for this long is closed; a request whose head
    # (request line and headers) started but is not whole within header_timeout_seconds is
    # answered 408 (receiver/connections.py).
    idle_timeout_seconds: float = 60.0
    header_timeout_seconds: float = 10.0
    # Client connections one process holds at most; 0: the descriptor limit less a headroom.
    max_connections: int = 0
    # A request target longer than this is answered 414; a whole head (request line and
    # headers) over max_header_bytes has its connection closed unanswered.
    max_url_bytes: int = 32768
    max_header_bytes: int = 131072
    # Bytes one process holds in request bodies still arriving; past it, 503 (receiver/body.py).
    max_buffered_bytes: int = 64 * 1024 * 1024
    # A folder holding a copy of analytics-next's dist/umd files: served as the first-party
    # analytics.js (receiver/bundle.py). Empty: not served.
    browser_sdk_dir: str = ""


@dataclass(frozen=True)
class WorkerConfig:
    # How often an idle job looks for work; a job that finds a backlog drains it without waiting.
    poll_interval_seconds: float = 0.1
    # Outbox rows decoded per transaction: short, so the receiver's commits never wait long.
    decode_batch_rows: int = 100
    # Events (and refused messages) expanded per decode transaction, however many rows that
    # takes: bounds the worker's memory when rows are big batches.
    decode_batch_events: int = 2000
    # A claimed delivery is leased this long (renewed while its batch is in flight); a crashed
    # worker's claims come back after it. Longer than any adapter timeout.
    lease_seconds: float = 30.0
    # A (source, messageId) seen within this window is not delivered again.
    dedup_window_days: float = 7.0
    outbox_retention_days: float = 7.0
    delivered_retention_days: float = 7.0
    dead_retention_days: float = 30.0
    rejected_retention_days: float = 30.0
    retention_interval_seconds: float = 3600.0
    # SQLite only: wal_checkpoint(TRUNCATE) so the WAL cannot grow without bound.
    checkpoint_interval_seconds: float = 60.0
    reaper_interval_seconds: float = 5.0
    # Set context.ip from the request's address when the message has none.
    add_context_ip: bool = True


@dataclass(frozen=True)
class AdminConfig:
    """The operator console's listener (receiver/admin/): the dashboard, the admin API and
    ``/metrics``, on a port of its own so nothing there competes with the tracking API's."""
    enabled: bool = True
    host: str = "127.0.0.1"
    # 0 turns the listener off, as enabled = false does.
    port: int = 8089
    # Empty: no login, allowed only on a loopback host. Otherwise every route but /metrics and
    # /health needs "Authorization: Bearer <token>" or the dashboard's login.
    token: str = ""
    # prometheus-client's multiprocess folder, shared by the receiver processes and the worker
    # (each writes its own files). Empty: a fresh private folder per `run`/`serve`; set it to
    # one folder for a `serve` and a `worker` on the same machine to see both in /metrics.
    metrics_dir: str = ""

    @property
    def serving(self) -> bool:
        return self.enabled and self.port != 0


@dataclass(frozen=True, kw_only=True)
class DestinationSettings:
    """The settings every destination takes, whatever its type."""

    # Events per adapter call; the default comes from the adapter type.
    batch_size: int = 100
    # Names that the integrations object may use for it ("Mixpanel": false).
    aliases: tuple[str, ...] = ()
    # Filters: empty means every message type / every event name.
    types: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    max_attempts: int = 10
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    max_age_seconds: float = 10800.0
    # Deliveries claimed per round; the adapter receives them batch_size at a time.
    claim_size: int = 100
    # "user": one user's events (userId, else anonymousId) reach this destination in the
    # order they were stored, one at a time, and a retry holds that user's later events back
    # (README, Per-user ordering). "none": no order is kept.
    ordering: str = "none"


@dataclass(frozen=True, kw_only=True)
class DestinationConfig(DestinationSettings):
    name: str
    type: str
    # The adapter's own settings: an instance of its Options dataclass.
    options: Any


@dataclass(frozen=True)
class SourceConfig:
    name: str
    write_keys: tuple[str, ...]
    destinations: tuple[str, ...] | None = None
    # Browser safety (a browser write key is public): requests carrying an Origin not listed
    # here are refused 403; empty allows every origin. Patterns: pipeline/origins.py.
    allowed_origins: tuple[OriginPattern, ...] = ()
    # Requests a second (token bucket; 0 is off) for the whole source, and per client address
    # using it; a burst of 0 means max(1, rate).
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 0
    client_rate_limit_per_second: float = 0.0
    client_rate_limit_burst: int = 0


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    sources: tuple[SourceConfig, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    log_level: str = "INFO"
    # "text": key=value lines (logfmt); "json": one JSON object a line, the same fields.
    log_format: str = "text"

    @property
    def open_mode(self) -> bool:
        """No sources configured: every request is accepted, write key optional."""
        return not self.sources


SECTIONS: dict[str, type] = {"database": DatabaseConfig, "receiver": ReceiverConfig, "worker": WorkerConfig,
                             "admin": AdminConfig}
LOG_FORMATS = ("text", "json")
_CHOICES = {
    ("database", "sqlite_synchronous"): {"FULL", "NORMAL", "EXTRA", "OFF"},
    ("receiver", "partial_success_status"): {200, 207},
}


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _convert(where: str, raw: Any, hint: Any, from_env: bool) -> Any:
    """Coerce one value to the field's type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        choices = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if set(choices) == {int, str}:
            # A number or a word (concurrency = 64, or "adaptive"): the adapter checks which.
            if isinstance(raw, str) and not (from_env and raw.strip().isdigit()):
                return raw
            choices = [int]
        hint = choices[0]
        origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise ConfigError(f"{where}: expected a table of strings")
        return dict(raw)
    if origin is tuple:
        if from_env and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            # Name the type, never the value: it may be a write key.
            raise ConfigError(f"{where}: expected a list of strings, got {_kind(raw)}")
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
        except (ValueError, OverflowError):  # int(float("inf")) overflows
            value = None
        # NaN and infinity are floats too (TOML nan/inf, or "nan" in the environment): no
        # setting means either, and NaN passes every comparison below. (Only a float can be
        # either; math.isfinite would overflow on an int of 400 digits.)
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or (hint is int and isinstance(raw, float) and raw != int(raw)):
            raise ConfigError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {raw!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {raw!r}")
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: expected a string, got {_kind(raw)}")
    return raw


def _kind(raw: Any) -> str:
    if isinstance(raw, list):
        return "a list with " + (", ".join(sorted({type(x).__name__ for x in raw})) or "nothing")
    return type(raw).__name__


def _build_section(name: str, cls: type, table: Mapping[str, Any], env: Mapping[str, str],
                   overrides: Mapping[str, Any], label: str | None = None) -> Any:
    label = label or f"[{name}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{label}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            extra = sorted(_COMMON_DESTINATION_KEYS) if label.startswith("[[destinations]]") else []
            raise ConfigError(f"{label} {key}: unknown key (known: {', '.join(sorted(known | set(extra)))})")
    values: dict[str, Any] = {}
    for key in known:
        where = f"{label} {key}"
        # A bad value in the file fails even where the environment or a flag overrides it.
        value = _convert(where, table[key], hints[key], False) if key in table else None
        if overrides.get(key) is not None:
            value = _convert(f"--{key.replace('_', '-')}", overrides[key], hints[key], True)
        elif env_name(name, key) in env:
            value = _convert(env_name(name, key), env[env_name(name, key)], hints[key], True)
        elif key not in table:
            continue
        if isinstance(value, str) and (name, key) in _CHOICES:
            value = value.upper()
        choices = _CHOICES.get((name, key))
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}: must be one of {sorted(choices)}, got {value!r}")
        values[key] = value
    for f in dataclasses.fields(cls):
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{label} {f.name}: required")
    return cls(**values)


def _build_sources(raw: Any) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError("[[sources]]: expected an array of tables")
    sources, seen_names, seen_keys = [], set(), set()
    for i, table in enumerate(raw):
        where = f"[[sources]] #{i + 1}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(table) - _SOURCE_KEYS
        if unknown:
            raise ConfigError(f"{where} {sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_SOURCE_KEYS))})")
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
        sources.append(SourceConfig(name=name, write_keys=keys, destinations=dests,
                                    **_browser_safety(f"[[sources]] {name}", table)))
    return tuple(sources)


MIN_RATE = 0.001
_LIMIT_KEYS = {"rate_limit_per_second": float, "rate_limit_burst": int,
               "client_rate_limit_per_second": float, "client_rate_limit_burst": int}
_SOURCE_KEYS = {"name", "write_keys", "destinations", "allowed_origins", *_LIMIT_KEYS}


def _browser_safety(where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """A source's allowed_origins (parsed) and rate limits (checked)."""
    values: dict[str, Any] = {key: _convert(f"{where} {key}", table[key], hint, False)
                              for key, hint in _LIMIT_KEYS.items() if key in table}
    patterns = []
    for text in _convert(f"{where} allowed_origins", table.get("allowed_origins", []), tuple[str, ...], False):
        try:
            patterns.append(parse_pattern(text))
        except ValueError as exc:
            raise ConfigError(f"{where} allowed_origins: {exc}") from None
    values["allowed_origins"] = tuple(patterns)
    for scope in ("", "client_"):
        rate = values.get(f"{scope}rate_limit_per_second")
        if values.get(f"{scope}rate_limit_burst") and not rate:
            raise ConfigError(f"{where} {scope}rate_limit_burst: needs {scope}rate_limit_per_second")
        if rate and rate < MIN_RATE:  # a token every 1000 s at most: a slower one is no rate
            raise ConfigError(f"{where} {scope}rate_limit_per_second: must be 0 (off) or at least {MIN_RATE}")
    return values


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
    allowed = set(SECTIONS) | {"sources", "destinations", "log_level", "log_format"}
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
    log_format = overrides.get("", {}).get("log_format") or env.get(f"{ENV_PREFIX}LOG_FORMAT") \
        or data.get("log_format", "text")
    if not isinstance(log_format, str) or log_format.lower() not in LOG_FORMATS:
        raise ConfigError(f"log_format: must be text or json, got {log_format!r}")
    destinations = _build_destinations(data.get("destinations", []))
    sources = _build_sources(data.get("sources", []))
    known = {d.name for d in destinations}
    for source in sources:
        for name in source.destinations or ():
            if name not in known:
                raise ConfigError(f"[[sources]] {source.name} destinations: no destination named {name!r} "
                                  f"(configured: {', '.join(sorted(known)) or 'none'})")
    config = Config(sources=sources, destinations=destinations, log_level=log_level.upper(),
                    log_format=log_format.lower(), **sections)
    _check_limits(config.receiver)
    _check_admin(config.admin)
    _check_worker(config.worker)
    return config


ORDERINGS = ("none", "user")
_COMMON_DESTINATION_KEYS = {f.name for f in dataclasses.fields(DestinationConfig)} - {"options"}


def _build_destinations(raw: Any) -> tuple[DestinationConfig, ...]:
    from pipeline.destinations.registry import UnknownDestinationType, destination_type

    if not isinstance(raw, list):
        raise ConfigError("[[destinations]]: expected an array of tables")
    built: list[DestinationConfig] = []
    for i, table in enumerate(raw):
        if not isinstance(table, Mapping):
            raise ConfigError(f"[[destinations]] #{i + 1}: expected a table")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"[[destinations]] #{i + 1} name: required, a non-empty string")
        where = f"[[destinations]] {name}"
        if any(d.name == name for d in built):
            raise ConfigError(f"{where} name: used twice")
        kind = table.get("type")
        if not isinstance(kind, str):
            raise ConfigError(f"{where} type: required, the name of an installed destination type")
        try:
            cls = destination_type(kind)
        except UnknownDestinationType as exc:
            raise ConfigError(f"{where} type: {exc}") from None
        common = {k: v for k, v in table.items() if k in _COMMON_DESTINATION_KEYS and k not in ("name", "type")}
        own = {k: v for k, v in table.items() if k not in _COMMON_DESTINATION_KEYS}
        options = _build_section(f"destinations.{name}", cls.Options, own, {}, {}, label=where)
        common.setdefault("batch_size", cls.default_batch_size)
        settings = dataclasses.asdict(_build_section(f"destinations.{name}", DestinationSettings, common, {}, {},
                                                     label=where))
        if "claim_size" not in common:
            settings["claim_size"] = max(100, settings["batch_size"])
        built.append(DestinationConfig(name=name, type=kind, options=options, **settings))
        _check_destination(built[-1], where)
        try:
            # Adapters check their own settings when built (a URL that is not http, a bad
            # header): fail here, at start-up, not on every delivery.
            cls(name, options, settings["batch_size"])
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(built)


def _check_destination(dest: DestinationConfig, where: str) -> None:
    from pipeline.messages import MESSAGE_TYPES

    for key in ("batch_size", "max_attempts", "claim_size"):
        if getattr(dest, key) < 1:
            raise ConfigError(f"{where} {key}: must be at least 1")
    for kind in dest.types:
        if kind not in MESSAGE_TYPES:
            raise ConfigError(f"{where} types: {kind!r} is not one of {', '.join(MESSAGE_TYPES)}")
    if dest.claim_size < dest.batch_size:
        raise ConfigError(f"{where} claim_size: must be at least batch_size")
    if dest.ordering not in ORDERINGS:
        raise ConfigError(f"{where} ordering: must be one of {', '.join(map(repr, ORDERINGS))}, got {dest.ordering!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is only reachable from this machine."""
    import ipaddress

    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_admin(admin: AdminConfig) -> None:
    if admin.port > 65535:
        raise ConfigError("[admin] port: must be at most 65535")
    if admin.serving and not admin.token and not is_loopback(admin.host):
        raise ConfigError(f"[admin] host: {admin.host!r} is not a loopback address and no [admin] token is set: "
                          "the console can replay and discard deliveries, so set a token "
                          "(TRACKRELAY_ADMIN_TOKEN) or listen on 127.0.0.1")


def _check_worker(worker: WorkerConfig) -> None:
    if worker.lease_seconds < 1:
        raise ConfigError("[worker] lease_seconds: must be at least 1 (a claim is leased, and renewed, "
                          "for this long)")


def _check_limits(receiver: ReceiverConfig) -> None:
    if receiver.processes < 1:
        raise ConfigError("[receiver] processes: must be at least 1")
    if receiver.port > 65535:  # 0 asks the system for a free port
        raise ConfigError("[receiver] port: must be at most 65535")
    for key in ("max_call_bytes", "max_batch_bytes", "max_message_bytes", "commit_max_rows"):
        if getattr(receiver, key) < 1:
            raise ConfigError(f"[receiver] {key}: must be at least 1")
    if receiver.commit_gather_ms > 1000:  # negative values are refused with every other number
        raise ConfigError("[receiver] commit_gather_ms: must be at most 1000 (a request waits up to this long "
                          "for others to share its commit)")
    for key in ("body_timeout_seconds", "idle_timeout_seconds", "header_timeout_seconds"):
        if getattr(receiver, key) < 1:
            raise ConfigError(f"[receiver] {key}: must be at least 1")
    if receiver.max_connections < 0:
        raise ConfigError("[receiver] max_connections: must be 0 (from the descriptor limit) or more")
    if receiver.max_url_bytes < 1024:
        raise ConfigError("[receiver] max_url_bytes: must be at least 1024")
    if receiver.max_header_bytes < receiver.max_url_bytes + 1024:
        raise ConfigError("[receiver] max_header_bytes: must be at least max_url_bytes + 1024 (the head holds "
                          "the URL and the headers)")
    if receiver.max_buffered_bytes < max(receiver.max_call_bytes, receiver.max_batch_bytes):
        raise ConfigError("[receiver] max_buffered_bytes: must be at least the largest request limit")
    if receiver.public_url:
        _check_public_url(receiver.public_url)
    if receiver.browser_sdk_dir and not Path(receiver.browser_sdk_dir, "standalone.js").is_file():
        raise ConfigError(f"[receiver] browser_sdk_dir: {receiver.browser_sdk_dir}/standalone.js not found (copy "
                          "analytics-next's dist/umd folder there: see the README's Websites section)")
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
    lines.append(f"  log_format{'':<23} {ENV_PREFIX + 'LOG_FORMAT':<44} default 'text'")
    return "\n".join(lines)


def _check_public_url(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise ConfigError(f"[receiver] public_url: expected http(s)://host[:port][/path], got {url!r}")
