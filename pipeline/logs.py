"""Log lines as ``key=value`` pairs (logfmt) or JSON objects, one event per line, never a write key."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s pid=%(process)d %(message)s"


# What Tornado puts in its own log lines about a request it could not parse: the offending
# header's whole value ("Invalid header value 'Basic S0VZOg==\x01'"), which may be a credential.
_HEADER_VALUE = re.compile(r"(Invalid header value) .*", re.DOTALL)
# Credentials however they got into a line: an Authorization scheme and its token.
_CREDENTIAL = re.compile(r"\b(Basic|Bearer)\s+[^\s'\",;]+", re.IGNORECASE)


def without_credentials(text: str) -> str:
    """``text`` with header values Tornado quotes and any Basic/Bearer credential taken out."""
    return _CREDENTIAL.sub(r"\1 [redacted]", _HEADER_VALUE.sub(r"\1 [not logged: it may hold a credential]", text))


class CredentialFilter(logging.Filter):
    """Takes header values and credentials out of every line before it is written (our own
    lines never carry one; Tornado's parse errors and third-party libraries may). Both
    formats format the cleaned message, so text and JSON lines are cleaned alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = without_credentials(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class TextFormatter(logging.Formatter):
    """The logfmt line; a traceback (which may quote a header) is cleaned like the message."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return without_credentials(super().formatException(ei))


# One pair of a logfmt message: a key, then a quoted value (Python's repr, as %r writes it) or
# a bare one up to the next space.
_PAIR = re.compile(r"""([A-Za-z_][A-Za-z0-9_.]*)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"]*)(?:\s+|$)""")
# "Clearly numeric": an integer without a leading zero (a port, a count, a pid) or a decimal
# with digits on both sides of the point (0.5). Everything else stays a string: "5s", "1e3",
# "007", "inf", "true", "none".
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]{0,15})(?:\.[0-9]+)?")
# The fields every line has; a message pair of the same name is written as "msg.<name>".
RESERVED = ("time", "level", "logger", "pid", "message", "exception")


def message_fields(message: str) -> dict[str, Any] | None:
    """The pairs of a ``key=value`` message, values decoded; None if it is not only pairs."""
    fields: dict[str, Any] = {}
    position = 0
    message = message.strip()
    while position < len(message):
        match = _PAIR.match(message, position)
        if match is None:
            return None
        key, raw = match.groups()
        fields[f"msg.{key}" if key in RESERVED else key] = _value(raw)
        position = match.end()
    return fields or None


def _value(raw: str) -> Any:
    if raw[:1] in ("'", '"'):
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    if _NUMBER.fullmatch(raw):
        return float(raw) if "." in raw else int(raw)
    return raw


class JsonFormatter(logging.Formatter):
    """One JSON object a line with the logfmt line's fields: ``time`` (ISO-8601 UTC with
    milliseconds), ``level``, ``logger``, ``pid``, each ``key=value`` pair of the message as a
    field of its own (or the whole message under ``message`` when it is not only pairs), and
    ``exception`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, timezone.utc)
        line: dict[str, Any] = {"time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
                                "level": record.levelname, "logger": record.name, "pid": record.process}
        message = record.getMessage()
        fields = message_fields(message)
        if fields is None:
            line["message"] = message
        else:
            line.update(fields)
        if record.exc_info:
            line["exception"] = without_credentials(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = without_credentials(record.exc_text)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(CredentialFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Tornado's per-request access lines are off (see receiver.app); keep its warnings.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # Alembic narrates every revision check; `trackrelay migrate` logs what it changed itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)


class Throttled:
    """A warning that can repeat many times a second (one per 503 during an outage, one per
    failed lane) logged at most once per ``interval`` for each kind, the line saying how many
    were folded into it (``folded=N``: the ones left out since the last line of that kind)."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._kinds: dict[str, list[float | int]] = {}  # kind -> [last logged at, folded since]

    def warning(self, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line of ``kind`` went out within the interval;
        return whether it was logged."""
        now = self.clock()
        state = self._kinds.get(kind)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return False
        folded = int(state[1]) if state is not None else 0
        if len(self._kinds) > 10_000:  # kinds carry a destination or route name: bounded anyway
            self._kinds.clear()
        self._kinds[kind] = [now, 0]
        if folded:
            self.logger.warning(message + " folded=%d", *args, folded)
        else:
            self.logger.warning(message, *args)
        return True
