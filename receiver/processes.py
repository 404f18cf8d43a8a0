"""Running several processes from one parent: fork, forward signals, and reap.

The receiver's ``--processes N`` forks N children that share the listening socket; the parent
only forwards SIGINT/SIGTERM (and SIGHUP, a reload, in the order the targets were given) and
waits. If a child dies on its own, the others are stopped and
the parent exits 1, so a supervisor (systemd, Kubernetes) restarts the whole unit cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence

log = logging.getLogger("trackrelay.processes")


def supervise(targets: Sequence[Callable[[], int]]) -> int:
    """Run each target in a forked child; return 0 if all exited 0 after a requested stop."""
    children: dict[int, int] = {}
    for index, target in enumerate(targets):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                code = target()
            except BaseException:
                log.exception("event=child_failed index=%d", index)
            finally:
                os._exit(code)
        children[pid] = index
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            _kill(child, signal.SIGTERM)

    def forward_hangup(signum: int, _frame: object) -> None:
        log.info("event=reload_requested children=%d", len(children))
        for child in sorted(children, key=children.__getitem__):  # the targets' order
            _kill(child, signal.SIGHUP)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward_hangup)
    status = 0
    try:
        while children:
            pid, wait_status = os.wait()
            if pid not in children:
                continue
            del children[pid]
            code = os.waitstatus_to_exitcode(wait_status)
            if code != 0:
                status = 1
            if not stopping and children:
                log.error("event=child_exited pid=%d code=%d action=stopping_all", pid, code)
                stop(signal.SIGTERM, None)
                status = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
