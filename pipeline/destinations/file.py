"""The ``file`` destination: JSON lines in a directory, rotated by UTC day and by size.

Files are named ``<prefix>-YYYY-MM-DD.jsonl`` after the UTC day they are written on; when the
next line would take the current file past ``max_bytes`` the day continues in
``<prefix>-YYYY-MM-DD.1.jsonl``, ``.2`` and so on (a line larger than ``max_bytes`` gets a file
of its own). Every chunk of ``batch_size`` events is written and fsynced (and the directory
too when a file was created) before its events count as delivered, so an acknowledged event
survives a crash or a power cut.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson

from pipeline.destinations.base import DELIVERED, Destination, Event, Outcome, inherits, rejected, retry


@dataclass(frozen=True)
class FileOptions:
    path: str
    max_bytes: int = 104857600
    prefix: str = "events"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class FileDestination(Destination):
    Options = FileOptions
    default_batch_size = 500

    def __init__(self, name: str, options: FileOptions, batch_size: int,
                 *, clock: Callable[[], datetime] = _utc_now) -> None:
        super().__init__(name, options, batch_size)
        if options.max_bytes < 1:
            raise ValueError(f"file destination {name!r} max_bytes: must be at least 1")
        if not options.prefix or "/" in options.prefix or os.sep in options.prefix:
            raise ValueError(f"file destination {name!r} prefix: must be a non-empty file name part "
                             f"without '/', got {options.prefix!r}")
        self.directory = Path(options.path)
        self._clock = clock
        # The UTC day and size index last written to; found again by a scan after a restart.
        self._day: str | None = None
        self._index = 0
        self._lock = threading.Lock()

    @property
    def takes_stored_json(self) -> bool:
        # Each event becomes orjson.dumps(event) and a newline (in this class's deliver).
        return inherits(self, FileDestination, "deliver")

    async def start(self) -> None:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)

    async def check(self) -> str | None:
        if not await asyncio.to_thread(os.access, self.directory, os.W_OK | os.X_OK):
            return f"directory {self.directory} is missing or not writable"
        return None

    async def deliver(self, events: Sequence[Event]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        lines: list[tuple[int, bytes]] = []
        for i, event in enumerate(events):
            try:
                lines.append((i, orjson.dumps(event) + b"\n"))
            except TypeError as exc:
                outcomes[i] = rejected(f"cannot serialise event as JSON: {exc}")
        for start in range(0, len(lines), self.batch_size):
            chunk = lines[start:start + self.batch_size]
            written, error = await asyncio.to_thread(self._append, [line for _, line in chunk])
            for n, (i, _) in enumerate(chunk):
                outcomes[i] = DELIVERED if n < written else retry(f"writing {self.directory}: {error}")
            if error is not None:
                # The disk is full or the directory unusable: the rest would fail the same way.
                for i, _ in lines[start + len(chunk):]:
                    outcomes[i] = retry(f"writing {self.directory}: {error}")
                break
        return [outcome for outcome in outcomes if outcome is not None]

    def _append(self, lines: list[bytes]) -> tuple[int, OSError | None]:
        """Write ``lines`` in order; return how many are durably written, and the error if any.

        Lines are grouped per file; a file's lines count only once it (and, for a new file, the
        directory) is fsynced. A failed write is cut back off the file, so no half line stays.
        """
        with self._lock:
            done = 0
            try:
                day = self._clock().astimezone(timezone.utc).strftime("%Y-%m-%d")
                if day != self._day:
                    self._index, self._day = self._last_index(day), day
                while done < len(lines):
                    done += self._fill_one_file(day, lines[done:])
            except OSError as exc:
                return done, exc
            return done, None

    def _fill_one_file(self, day: str, lines: list[bytes]) -> int:
        """Append as many of ``lines`` as fit in the current file; fsync; return the count."""
        path = self.directory / self._file_name(day, self._index)
        fd, created = _open_for_append(path)
        try:
            size = os.fstat(fd).st_size
            count, total = 0, size
            for line in lines:
                if total > 0 and total + len(line) > self.options.max_bytes:
                    break
                count, total = count + 1, total + len(line)
            if count == 0:
                self._index += 1
                return 0
            try:
                _write_all(fd, b"".join(lines[:count]))
                os.fsync(fd)
                if created:
                    _fsync_directory(self.directory)
            except OSError:
                _truncate_quietly(fd, size)
                raise
            return count
        finally:
            os.close(fd)

    def _file_name(self, day: str, index: int) -> str:
        suffix = f".{index}" if index else ""
        return f"{self.options.prefix}-{day}{suffix}.jsonl"

    def _last_index(self, day: str) -> int:
        pattern = re.compile(rf"{re.escape(self.options.prefix)}-{day}(?:\.([1-9][0-9]*))?\.jsonl")
        indexes = [int(m.group(1) or 0) for name in os.listdir(self.directory)
                   if (m := pattern.fullmatch(name))]
        return max(indexes, default=0)


def _open_for_append(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_WRONLY | os.O_APPEND), False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_directory(directory: Path) -> None:
    # A new file's directory entry is only durable once the directory itself is fsynced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass
