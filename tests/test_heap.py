"""pipeline.heap: serving processes freeze their start-up objects and collect young ones less often."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from tornado.netutil import bind_sockets

import pipeline.worker
import receiver.server
from conftest import make_config
from pipeline.heap import YOUNG_THRESHOLD

PROBE = """
import gc, json
from pipeline.heap import settle_for_serving
before = (gc.get_freeze_count(), gc.get_threshold())
settle_for_serving()
print(json.dumps([before, (gc.get_freeze_count(), gc.get_threshold())]))
"""


def test_settling_freezes_what_the_process_holds_and_raises_only_the_young_threshold() -> None:
    # In a process of its own: freezing this test process would keep its garbage for good.
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    (frozen_before, threshold_before), (frozen_after, threshold_after) = json.loads(done.stdout)

    assert frozen_before == 0
    assert frozen_after > 1000  # what the interpreter and its imports hold
    assert threshold_after == [YOUNG_THRESHOLD, *threshold_before[1:]]


def _settles_then_stops(monkeypatch: pytest.MonkeyPatch, module: Any, check: Any) -> list[Any]:
    """Replace ``module``'s settle_for_serving with one that records what ``check`` sees at
    that moment and then stops the process's loop the way SIGTERM does in production."""
    seen: list[Any] = []

    def settle() -> None:
        seen.append(check())
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into a clean stop

    monkeypatch.setattr(module, "settle_for_serving", settle)
    return seen


def test_a_receiver_process_settles_its_heap_once_it_accepts_connections(
        monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]

    def accepts() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True

    seen = _settles_then_stops(monkeypatch, receiver.server, accepts)

    assert receiver.server.run_receiver(make_config(sqlite_url), sockets) == 0
    assert seen == [True]


def test_a_worker_process_settles_its_heap_once_it_has_started(
        monkeypatch: pytest.MonkeyPatch, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pipeline.worker, "limit_malloc_arenas", lambda: True)  # leave this process's malloc alone
    caplog.set_level("INFO", logger="trackrelay")
    seen = _settles_then_stops(monkeypatch, pipeline.worker,
                               lambda: any("event=started role=worker" in r.getMessage() for r in caplog.records))

    assert pipeline.worker.run_worker(make_config(sqlite_url)) == 0
    assert seen == [True]


def test_a_parent_freezes_its_objects_just_before_it_forks_its_processes(
        monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    calls: list[str] = []
    sockets = bind_sockets(0, "127.0.0.1")
    monkeypatch.setattr(receiver.server, "bind_sockets", lambda port, host: sockets)
    monkeypatch.setattr(receiver.server, "freeze_before_fork", lambda: calls.append("freeze"))
    monkeypatch.setattr(receiver.server, "supervise", lambda targets: calls.append(f"fork {len(targets)}") or 0)
    try:
        assert receiver.server.serve(make_config(sqlite_url, processes=2)) == 0
    finally:
        for sock in sockets:
            sock.close()
    assert calls == ["freeze", "fork 2"]
