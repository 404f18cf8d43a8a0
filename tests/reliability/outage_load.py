"""What the store-fault tests share: real ``trackrelay`` processes (optionally as another OS
user), a loopback sink they deliver to, concurrent clients that record every answer, and the
figures drawn from those answers.

A client sends one event at a time; an event answered anything but ``200`` is sent again with
the same messageId (as every Segment client does with a ``503``) until it is acknowledged, so
that after the fault every event a client held was acknowledged, and each must be stored and
delivered. Clients resend after a short pause instead of honouring ``Retry-After``, to keep
the load up while the store is down.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from http_sink import HttpSink
from pipeline.config import DatabaseConfig
from pipeline.store import create_store_engine
from pipeline_harness import CONSOLE_OFF, event_ids, wait_for

SCRIPT = Path(sys.executable).with_name("trackrelay")
TRACKRELAY = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "receiver"]



# --- processes ---------------------------------------------------------------------------------

def unprivileged_user() -> list[str]:
    """The command prefix that runs a process as an unprivileged user: ``setpriv`` to ``nobody``
    when we are root (root ignores file modes), nothing when we are not root already."""
    if os.geteuid() != 0:
        return []
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


def owned_by(prefix: Sequence[str], path: Path) -> None:
    """Give ``path`` to the user ``prefix`` runs as (nothing to do without a prefix)."""
    if prefix:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def write_config(folder: Path, database_url: str, port: int, sink_url: str, lock_timeout: float = 1.0,
                 synchronous: str = "FULL") -> Path:
    """A config: the receiver on ``port`` (Retry-After 1 s), a fast worker, a webhook to the sink."""
    path = folder / "trackrelay.toml"
    path.write_text(f"""log_level = "INFO"
[database]
url = "{database_url}"
lock_timeout_seconds = {lock_timeout}
sqlite_synchronous = "{synchronous}"
[receiver]
port = {port}
retry_after_seconds = 1
[worker]
poll_interval_seconds = 0.05
lease_seconds = 2
reaper_interval_seconds = 0.5
[[destinations]]
name = "hook"
type = "webhook"
url = "{sink_url}/in"
retry_initial_seconds = 0.05
retry_max_seconds = 0.2
""", encoding="utf-8")
    path.chmod(0o644)
    return path


class Trackrelay:
    """One ``trackrelay`` command in its own process group, its log (stderr) in a file."""

    def __init__(self, command: str, config: Path, log: Path, prefix: Sequence[str] = ()) -> None:
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")} | dict([CONSOLE_OFF])
        with open(log, "wb") as stderr:
            self.popen = subprocess.Popen([*prefix, *TRACKRELAY, command, "--config", str(config)],
                                          cwd=config.parent, env=env, stdout=stderr, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> None:
        assert self.popen.poll() is None, f"trackrelay exited {self.popen.returncode}:\n{self.log[-3000:]}"

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL of the group if it has not exited within ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
            raise AssertionError(f"trackrelay did not stop within {timeout:.0f} s:\n{self.log[-3000:]}") from None


def run_command(command: str, config: Path, prefix: Sequence[str] = ()) -> None:
    """``trackrelay migrate`` and the like: must exit 0 within a minute."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")} | dict([CONSOLE_OFF])
    done = subprocess.run([*prefix, *TRACKRELAY, command, "--config", str(config)], cwd=config.parent, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, f"trackrelay {command} exited {done.returncode}: {done.stderr.decode()[-2000:]}"


def wait_answering(base_url: str, process: Trackrelay, timeout: float = 30) -> None:
    """Until ``/health`` answers at all (it may answer 503: the store may be down already)."""
    def answers() -> bool:
        process.alive()
        try:
            httpx.get(base_url + "/health", timeout=2)
            return True
        except httpx.HTTPError:
            return False
    wait_for(answers, "the receiver to answer /health", timeout)


def health(base_url: str) -> tuple[int, str]:
    response = httpx.get(base_url + "/health", timeout=30)
    return response.status_code, response.text


# --- clients -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    message_id: str
    started: float  # time.monotonic() when sent
    answered: float
    status: int | None  # None: no answer (the connection failed or timed out)
    retry_after: str | None

    @property
    def latency(self) -> float:
        return self.answered - self.started


@dataclass
class Load:
    """``clients`` threads sending events to ``base_url`` until :meth:`finish`."""

    base_url: str
    clients: int = 6
    pause: float = 0.005
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        self._deadline = float("inf")

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(30.0)) as client:
            pending: str | None = None
            while time.monotonic() < self._deadline:
                if pending is None:
                    if self._stopping.is_set():
                        return
                    pending = uuid.uuid4().hex
                started = time.monotonic()
                try:
                    response = client.post("/v1/track", json={"userId": "u1", "event": "Outage",
                                                              "messageId": pending})
                    status, retry_after = response.status_code, response.headers.get("Retry-After")
                except httpx.HTTPError:
                    status, retry_after = None, None
                answer = Answer(pending, started, time.monotonic(), status, retry_after)
                with self._lock:
                    self.answers.append(answer)
                if status == 200:
                    pending = None
                    time.sleep(self.pause)
                else:
                    time.sleep(0.05)

    def acked_since(self, moment: float) -> bool:
        """Whether a request sent after ``moment`` was answered 200."""
        with self._lock:
            return any(a.status == 200 and a.started >= moment for a in self.answers)

    def wait_acked_since(self, moment: float, timeout: float = 20) -> float:
        """Seconds from ``moment`` to the answer of the first request sent after it that got 200."""
        wait_for(lambda: self.acked_since(moment), "a 200 after the store came back", timeout)
        with self._lock:
            return min(a.answered for a in self.answers if a.status == 200 and a.started >= moment) - moment

    def wait_answers(self, count: int, since: float, timeout: float = 20) -> None:
        """Until ``count`` answers came after ``since``."""
        def enough() -> bool:
            with self._lock:
                return sum(1 for a in self.answers if a.answered >= since) >= count
        wait_for(enough, f"{count} answers", timeout)

    def finish(self, timeout: float = 30) -> None:
        """Stop sending new events; each client resends what it holds until it is acknowledged."""
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout + 35)
        assert not any(t.is_alive() for t in self._threads), "a client did not finish"

    @property
    def acked(self) -> set[str]:
        return {a.message_id for a in self.answers if a.status == 200}

    @property
    def sent(self) -> set[str]:
        return {a.message_id for a in self.answers}

    def between(self, start: float, end: float) -> list[Answer]:
        """Answers that came between ``start`` and ``end``."""
        return [a for a in self.answers if start <= a.answered <= end]

    def overlapping(self, start: float, end: float) -> list[Answer]:
        """Answers to requests in flight at some time between ``start`` and ``end``."""
        return [a for a in self.answers if a.answered >= start and a.started <= end]


def by_status(answers: Iterable[Answer]) -> str:
    counts = Counter(a.status for a in answers)
    return " ".join(f"{status}={counts[status]:,}" for status in sorted(counts, key=str))


# A commit the store finished just before it went down is answered 200 a moment later.
SETTLE_SECONDS = 0.5


def check_answers_while_down(load: Load, down_from: float, down_until: float, bound: float) -> tuple[list[Answer], float]:
    """Every answer is 200 or 503, every 503 carries Retry-After, none took longer than ``bound``,
    and every answer that came while the store was down (from :data:`SETTLE_SECONDS` after it
    went) was a 503. Returns those answers and the longest answer time of the requests in
    flight while it was down."""
    bad = [a for a in load.answers if a.status not in (200, 503)]
    assert not bad, f"answers other than 200/503: {by_status(bad)} (first {bad[0]})"
    no_header = [a for a in load.answers if a.status == 503 and not a.retry_after]
    assert not no_header, f"{len(no_header)} 503s without Retry-After"
    down = load.between(down_from + SETTLE_SECONDS, down_until)
    assert down and all(a.status == 503 for a in down), f"while down: {by_status(down)}"
    worst = max(a.latency for a in load.overlapping(down_from, down_until))
    slowest = max(a.latency for a in load.answers)
    assert slowest <= bound, f"an answer took {slowest:.2f} s, over the documented bound of {bound:.2f} s"
    return down, worst


# --- what was stored and delivered -------------------------------------------------------------

def stored_ids(database_url: str) -> Counter[str]:
    """messageIds in the outbox (a row may be there twice: a commit that answered 503 late)."""
    engine = create_store_engine(DatabaseConfig(url=database_url))
    try:
        with engine.connect() as conn:
            bodies = conn.execute(sa.text("SELECT body FROM outbox")).scalars().all()
    finally:
        engine.dispose()
    return Counter(orjson.loads(bytes(body))["messageId"] for body in bodies)


def nothing_lost(load: Load, database_url: str, delivered: Counter[str]) -> tuple[set[str], Counter[str]]:
    """Every event sent was acknowledged in the end (refused ones are resent), and every one
    acknowledged is stored and delivered; returns (acked, stored) for the figures."""
    stored = stored_ids(database_url)
    acked = load.acked
    assert acked == load.sent, "an event was never acknowledged"
    assert acked <= set(stored), f"{len(acked - set(stored))} acknowledged events not stored"
    assert acked <= set(delivered), f"{len(acked - set(delivered))} acknowledged events not delivered"
    return acked, stored


def delivered_ids(sink: HttpSink) -> Counter[str]:
    return Counter(i for recorded in list(sink.requests) for i in event_ids(recorded))


def wait_delivered(sink: HttpSink, expected: set[str], process: Any, timeout: float = 30) -> Counter[str]:
    """Until every id in ``expected`` reached the sink; the worker (``process``) must stay up."""
    def all_there() -> bool:
        process.alive()
        return expected <= set(delivered_ids(sink))
    wait_for(all_there, f"{len(expected):,} events at the sink", timeout)
    return delivered_ids(sink)
