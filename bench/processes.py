"""Real server processes for the benchmarks: started pinned to a CPU, waited for, measured, stopped.

The servers (trackrelay, the hello-world app, the sink) run on ``SERVER_CPUS`` and the load
(wrk, the latency sender, this orchestrator) on ``LOAD_CPUS``, so that the load generator
never takes the CPU it is measuring.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path


class BenchError(Exception):
    """A benchmark could not be measured (a server did not start, a drain timed out...)."""


def _cpu_sets() -> tuple[set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[0]}, {cpus[1]}


SERVER_CPUS, LOAD_CPUS = _cpu_sets()
_SCRIPT = Path(sys.executable).with_name("trackrelay")
TRACKRELAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "receiver"]
ROOT = Path(__file__).resolve().parent.parent


def cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without TRACKRELAY_* (the shell's settings must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Process:
    """A subprocess whose output goes to a log file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cpus: set[int],
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=clean_env(env), cwd=ROOT)
        # Threads the process starts later inherit this; Python starts none before its imports.
        os.sched_setaffinity(self.popen.pid, cpus)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not listen on port {port} within {timeout:.0f} s") from None
                time.sleep(0.05)

    def wait_log(self, pattern: str, timeout: float = 30.0) -> str:
        """The first log line matching ``pattern`` (a regular expression)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if regex.search(line):
                    return line
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no log line matching {pattern!r} within {timeout:.0f} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def log_time(line: str) -> float:
    """Epoch seconds of a trackrelay log line (``2024-05-01 12:00:00,123 level=...``)."""
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [int(c) for c in children.read().split()]
    except OSError:
        pass
    return found


class RssSampler:
    """Samples the RSS of a process and of its children every 50 ms; ``peak_mb`` is the largest
    RSS any one of them reached (a per-process figure)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in [self.pid, *_children(self.pid)]:
                self.peak_mb = max(self.peak_mb, rss_mb(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
