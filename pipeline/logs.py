"""Log lines as ``key=value`` pairs (logfmt), one event per line, never a write key."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s pid=%(process)d %(message)s"


# What Tornado puts in its own log lines about a request it could not parse: the offending
# header's whole value ("Invalid header value 'Basic S0VZOg==\x01'"), which may be a credential.
_HEADER_VALUE = re.compile(r"(Invalid header value) .*", re.DOTALL)
# Credentials however they got into a line: an Authorization scheme and its token.
_CREDENTIAL = re.compile(r"\b(Basic|Bearer)\s+[^\s'\",;]+", re.IGNORECASE)


class CredentialFilter(logging.Filter):
    """Takes header values and credentials out of every line before it is written (our own
    lines never carry one; Tornado's parse errors and third-party libraries may)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _CREDENTIAL.sub(r"\1 [redacted]", _HEADER_VALUE.sub(r"\1 [not logged: it may hold a credential]",
                                                                     message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
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
