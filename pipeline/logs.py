"""Log lines as ``key=value`` pairs (logfmt), one event per line, never a write key."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s pid=%(process)d %(message)s"


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Tornado's per-request access lines are off (see receiver.app); keep its warnings.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # Alembic narrates every revision check; `trackrelay migrate` logs what it changed itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
