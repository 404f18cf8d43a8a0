"""Running a process's main coroutine on the fastest event loop available.

uvloop (libuv) runs Tornado's request handling measurably faster than asyncio's own loop
(see bench/RESULTS.md, R1); where it is not installed, asyncio's loop does the same work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
