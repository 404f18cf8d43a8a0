"""pipeline.heap: serving processes freeze their start-up objects and collect young ones less often."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

import pytest

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


def _settled_before_the_loop_runs(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(module, "settle_for_serving", lambda: calls.append("settle"))

    def run(main: Coroutine[Any, Any, Any]) -> int:
        main.close()  # never started: only the order of the calls is under test
        calls.append("loop")
        return 0

    monkeypatch.setattr(module.event_loop, "run", run)
    return calls


def test_a_receiver_process_settles_its_heap_before_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _settled_before_the_loop_runs(monkeypatch, receiver.server)

    assert receiver.server.run_receiver(make_config("sqlite:///unused.db"), []) == 0
    assert calls == ["settle", "loop"]


def test_a_worker_process_settles_its_heap_before_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _settled_before_the_loop_runs(monkeypatch, pipeline.worker)
    monkeypatch.setattr(pipeline.worker, "limit_malloc_arenas", lambda: True)

    assert pipeline.worker.run_worker(make_config("sqlite:///unused.db")) == 0
    assert calls == ["settle", "loop"]
