"""The garbage collector, set for a long-running server process.

A ``/v1/batch`` request of 100 messages builds some 3,000 dicts and lists and drops them a
millisecond later; a worker's decode group builds many times that. At CPython's default
threshold (a young collection every 700 new containers) collections run in the middle of that
work, move the request's objects into older generations while they are still alive, and make
the full collections that follow walk every object in the process, nearly all of them the
modules and settings loaded at start-up, which never become garbage.

So a serving process, once started, freezes what it holds (``gc.freeze``: those objects are
never examined again) and lets the young generation grow to ``YOUNG_THRESHOLD`` containers
before a collection, so that one request's objects are usually freed by reference counting
before a collection ever sees them. Receiver CPU per 100-message request (R3, SQLite,
interleaved runs; commit 8338821): 2.3-3.4 ms before, 1.65-2.2 ms after; R1 did not move.

A parent that forks its processes (``--processes``, ``run``) freezes its own objects just
before the fork, so that the children's collections never write to the pages they share
with it (copy-on-write), as the ``gc.freeze`` documentation advises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

YOUNG_THRESHOLD = 10_000


def freeze_before_fork() -> None:
    """Freeze what the process holds; what it left as garbage is freed first, not frozen."""
    gc.collect()
    gc.freeze()


def settle_for_serving() -> None:
    """Call once start-up is done (application, connections, adapters), in the process that
    serves: after any fork, never in a process that will run other things afterwards (tests)."""
    freeze_before_fork()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``).

    Request bodies arrive as 64 KB pieces, below glibc's mmap threshold, so they live in the
    heap; when a thousand stalled bodies go, their pages stay with the process (641 MB of 662
    MB did, issue 12) until trimmed. Without glibc (musl) this does nothing."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _LIBC.append(libc if libc is not None and hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]
