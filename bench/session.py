"""What every figure is given: the options, a work directory, fresh databases, and the facts
that later figures reuse (R1's rate for R4 and R6, the receiver's RSS for R7)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.databases import Database, Databases
from bench.processes import SERVER_CPUS, BenchError, clean_env, cpu_list


@dataclass(frozen=True)
class Options:
    duration: float = 5.0  # seconds per wrk run
    runs: int = 3
    connections: int = 32
    big: bool = False


@dataclass
class Session:
    options: Options
    workdir: Path
    databases: Databases
    # (backend, name) -> value: what one figure measured that another compares against.
    facts: dict[tuple[str, str], Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def body_file(self, name: str, body: bytes) -> Path:
        path = self.workdir / f"{name}.json"
        path.write_bytes(body)
        return path

    def raw(self, what: str, database: Database, **arguments: float) -> dict[str, Any]:
        """A ceiling of ``bench.raw``, in a subprocess pinned to the server CPU."""
        argv = ["taskset", "-c", cpu_list(SERVER_CPUS), sys.executable, "-m", "bench.raw", what,
                database.backend, database.dsn]
        for key, value in arguments.items():
            argv += [f"--{key}", str(value)]
        done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=1800)
        if done.returncode != 0:
            raise BenchError(f"bench.raw {what} failed: {done.stderr.strip()[-2000:]}")
        return orjson.loads(done.stdout)
