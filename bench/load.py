"""Load from wrk, pinned to the load CPU, and a few checked requests before it starts."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.messages import USER_AGENT
from bench.processes import LOAD_CPUS, BenchError, cpu_list

POST_LUA = Path(__file__).with_name("post.lua")
UNIQUE_LUA = Path(__file__).with_name("unique.lua")  # a new messageId on every request


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed; install it with: apt-get install wrk", file=sys.stderr)
        raise SystemExit(2)


@dataclass(frozen=True)
class WrkResult:
    rate: float  # requests per second
    requests: int
    failed: int  # non-2xx answers and socket errors

    def note(self) -> str:
        return f"{self.failed} of {self.requests} requests failed" if self.failed else ""


def run_wrk(url: str, body: Path, seconds: float, connections: int, authorization: str = "",
            script: Path = POST_LUA) -> WrkResult:
    argv = ["taskset", "-c", cpu_list(LOAD_CPUS), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
            "--timeout", "10s", "-s", str(script), url, "--", str(body), authorization]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    if rate is None or requests is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    failed = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        failed += int(non_2xx.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        failed += sum(int(n) for n in errors.groups())
    return WrkResult(float(rate.group(1)), int(requests.group(1)), failed)


def post_checked(port: int, path: str, body: bytes, authorization: str = "", times: int = 20) -> None:
    """POST ``body`` a few times (it warms the server up) and insist on a 200 every time, so a
    figure never measures a server that refuses what wrk sends."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if authorization:
        headers["Authorization"] = authorization
    try:
        for _ in range(times):
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise BenchError(f"POST {path} answered {response.status}: {answer[:300]!r}")
    finally:
        connection.close()
