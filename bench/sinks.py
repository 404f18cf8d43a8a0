"""``bench.sink`` as R8-R10 use it: started with options on a CPU of their choice, its counters
and settings one request away, and the counters' differences over a measured window."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import LOAD_CPUS, BenchError, Process
from bench.servers import Sink


class ControlledSink(Sink):
    """A sink on the asyncio engine (``--latency-ms``, ``--capacity``, ``--status``, ``--never-answer``)."""

    def __init__(self, workdir: Path, cpus: set[int] = LOAD_CPUS, latency_ms: float = 0.0, capacity: int = 0,
                 status: int = 200, never_answer: bool = False) -> None:
        super().__init__(workdir, cpus=cpus, options=[
            "--engine", "asyncio", "--latency-ms", str(latency_ms), "--capacity", str(capacity),
            "--status", str(status), *(["--never-answer"] if never_answer else [])])

    def control(self, **settings: Any) -> dict[str, Any]:
        """Change ``latency_ms``, ``capacity``, ``status`` or ``never_answer`` from now on."""
        return self._call("/control", settings)


@dataclass(frozen=True)
class Window:
    """What a sink counted between two of its ``/stats`` snapshots."""

    seconds: float
    requests: int
    rejected: int
    events: int
    answered: int
    in_flight_seconds: float

    @classmethod
    def between(cls, start: dict[str, Any], end: dict[str, Any]) -> Window:
        return cls(end["now"] - start["now"], *(end[k] - start[k] for k in
                                                 ("requests", "rejected", "events", "answered", "in_flight_seconds")))

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds

    @property
    def answered_per_second(self) -> float:
        return self.answered / self.seconds

    @property
    def rejected_share(self) -> float:
        return self.rejected / self.requests if self.requests else 0.0

    @property
    def mean_in_flight(self) -> float:
        """Little's L: in-flight integrated over the window, divided by its length."""
        return self.in_flight_seconds / self.seconds


def wait_first_request(sinks: list[ControlledSink], process: Process, timeout: float = 60.0) -> float:
    """Wait until one of ``sinks`` has had a request; the sink clock's ``now`` then."""
    deadline = time.monotonic() + timeout
    while True:
        process.check_alive()
        for sink in sinks:
            stats = sink.stats()
            if stats["first"] is not None:
                return stats["first"]
        if time.monotonic() > deadline:
            raise BenchError(f"no sink had a request within {timeout:.0f} s")
        time.sleep(0.05)
