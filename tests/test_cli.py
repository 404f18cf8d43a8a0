"""The real ``trackrelay`` command, run as subprocesses: run, serve, migrate, exit codes, signals, logs."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pipeline_harness import free_port

SCRIPT = Path(sys.executable).with_name("trackrelay")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "receiver"]
WAIT_SECONDS = 30
_runs = itertools.count()



class Trackrelay:
    """One ``trackrelay`` process in its own process group, its stderr in a file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.stderr_path = cwd / f"stderr-{next(_runs)}.log"
        with open(self.stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(COMMAND + args, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=stderr, start_new_session=True)

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait(self) -> int:
        return self.popen.wait(WAIT_SECONDS)

    def wait_ready(self, port: int) -> None:
        """Wait until /health answers 200 on ``port``; fail if the process exits first."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"trackrelay exited {self.popen.returncode}:\n{self.log}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"trackrelay did not answer on port {port}:\n{self.log}")

    def wait_for_log(self, pattern: str, count: int = 1) -> list[str]:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            found = re.findall(pattern, self.log)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged {count} times:\n{self.log}")

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.wait()

    def kill_leftovers(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # the group holds our process and its children
        except ProcessLookupError:
            pass
        self.popen.wait(WAIT_SECONDS)


@pytest.fixture
def trackrelay(tmp_path: Path) -> Iterator[Callable[..., Trackrelay]]:
    """Start ``trackrelay <args>`` in tmp_path: ``trackrelay(*args, env={...})``."""
    started: list[Trackrelay] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Trackrelay:
        process = Trackrelay(list(args), tmp_path, {**os.environ, **(env or {})})
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill_leftovers()


def post_track(port: int, **kwargs: object) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/track", json={"userId": "u1", "event": "Signed Up"},
                      timeout=10, **kwargs)  # type: ignore[arg-type]


def outbox_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


def test_run_migrates_the_default_sqlite_database_accepts_events_and_stops_cleanly(
        trackrelay: Callable[..., Trackrelay], tmp_path: Path) -> None:
    port = free_port()
    process = trackrelay("run", "--port", str(port))
    process.wait_ready(port)

    response = post_track(port)

    assert (response.status_code, response.json()) == (200, {"Success": True})
    assert process.terminate() == 0
    assert re.search(r"level=INFO .*event=stopped role=receiver", process.log)
    assert outbox_count(tmp_path / "trackrelay.db") == 1


def test_serve_refuses_an_unmigrated_database_until_migrate(trackrelay: Callable[..., Trackrelay],
                                                            tmp_path: Path) -> None:
    port = free_port()

    refused = trackrelay("serve", "--port", str(port))
    assert refused.wait() == 1
    assert "run `trackrelay migrate`" in refused.log

    migrate = trackrelay("migrate")
    assert migrate.wait() == 0
    assert "event=migrated" in migrate.log

    served = trackrelay("serve", "--port", str(port))
    served.wait_ready(port)
    assert post_track(port).status_code == 200
    assert served.terminate() == 0
    assert outbox_count(tmp_path / "trackrelay.db") == 1


BAD_CONFIGS = {
    "unknown_key": ("[receiver]\nprot = 8000\n", "[receiver] prot: unknown key"),
    "wrong_type": ('[receiver]\nport = "eighty"\n', "[receiver] port: expected an integer"),
    "invalid_toml": ("[receiver\nport = 8000\n", "invalid TOML"),
}


@pytest.mark.parametrize("text,message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_config_file_exits_2_naming_the_key(trackrelay: Callable[..., Trackrelay], tmp_path: Path,
                                                  text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text, encoding="utf-8")

    process = trackrelay("run", "--config", "bad.toml", "--port", str(free_port()))

    assert process.wait() == 2
    assert message in process.log
    assert "configuration error" in process.log
    assert not (tmp_path / "trackrelay.db").exists()


def test_two_processes_serve_and_stop_on_sigterm(trackrelay: Callable[..., Trackrelay], tmp_path: Path) -> None:
    port = free_port()
    process = trackrelay("run", "--processes", "2", "--port", str(port))
    process.wait_ready(port)
    started = process.wait_for_log(r"pid=(\d+) event=started role=receiver", count=2)
    assert len(set(started)) == 2 and str(process.popen.pid) not in started

    statuses = [post_track(port).status_code for _ in range(20)]  # a new connection each

    assert statuses == [200] * 20
    assert process.terminate() == 0
    stopped = re.findall(r"pid=(\d+) event=stopped role=receiver", process.log)
    assert sorted(stopped) == sorted(started)
    assert outbox_count(tmp_path / "trackrelay.db") == 20


def test_the_port_comes_from_the_environment_and_the_flag_beats_it(trackrelay: Callable[..., Trackrelay]) -> None:
    env_port, flag_port = free_port(), free_port()

    from_env = trackrelay("run", env={"TRACKRELAY_RECEIVER_PORT": str(env_port)})
    from_env.wait_ready(env_port)
    assert from_env.terminate() == 0
    assert f"event=listening host=127.0.0.1 port={env_port} " in from_env.log

    from_flag = trackrelay("run", "--port", str(flag_port), env={"TRACKRELAY_RECEIVER_PORT": str(env_port)})
    from_flag.wait_ready(flag_port)
    assert from_flag.terminate() == 0
    assert f"event=listening host=127.0.0.1 port={flag_port} " in from_flag.log


def test_log_lines_never_hold_a_write_key(trackrelay: Callable[..., Trackrelay], tmp_path: Path) -> None:
    (tmp_path / "trackrelay.toml").write_text(
        '[[sources]]\nname = "website"\nwrite_keys = ["GoodKey4242"]\n', encoding="utf-8")
    port = free_port()
    process = trackrelay("run", "--port", str(port), "--log-level", "DEBUG",
                         env={"TRACKRELAY_CONFIG": "trackrelay.toml", "TRACKRELAY_DATABASE_LOCK_TIMEOUT_SECONDS": "0.3"})
    process.wait_ready(port)
    url = f"http://127.0.0.1:{port}"

    statuses = [
        post_track(port, auth=("GoodKey4242", "")).status_code,
        post_track(port, auth=("WrongKey1717", "")).status_code,
        httpx.post(f"{url}/v1/webhook?writeKey=QueryKey3131", json={"userId": "u", "event": "e"}).status_code,
        httpx.get(f"{url}/v1/pixel/track?userId=u&event=e&writeKey=PixelKey5353").status_code,
    ]
    # With the database locked the receiver logs its errors: they must not carry keys either.
    with sqlite3.connect(tmp_path / "trackrelay.db", isolation_level=None) as lock:
        lock.execute("BEGIN EXCLUSIVE")
        statuses.append(post_track(port, auth=("GoodKey4242", "")).status_code)
        statuses.append(httpx.post(f"{url}/v1/batch", json={"writeKey": "GoodKey4242", "batch": [
            {"type": "track", "userId": "u", "event": "e"}]}).status_code)
        lock.execute("ROLLBACK")
    assert process.terminate() == 0

    assert statuses == [200, 400, 400, 200, 503, 503]
    assert "event=store_unavailable" in process.log
    for key in ("GoodKey4242", "WrongKey1717", "QueryKey3131", "PixelKey5353"):
        assert key not in process.log


def test_run_stops_cleanly_on_sigint_to_its_process_group(trackrelay: Callable[..., Trackrelay],
                                                          tmp_path: Path) -> None:
    port = free_port()
    process = trackrelay("run", "--port", str(port))
    process.wait_ready(port)
    process.wait_for_log(r"event=started role=worker")
    assert post_track(port).status_code == 200

    os.killpg(process.popen.pid, signal.SIGINT)  # what Ctrl-C in a terminal does

    assert process.wait() == 0, process.log
    assert re.search(r"level=INFO .*event=stopped role=receiver", process.log)
    assert re.search(r"level=INFO .*event=stopped role=worker", process.log)
    assert "Traceback" not in process.log and "KeyboardInterrupt" not in process.log
    assert outbox_count(tmp_path / "trackrelay.db") == 1


def test_serve_on_a_port_already_taken_exits_1_saying_so(trackrelay: Callable[..., Trackrelay]) -> None:
    assert trackrelay("migrate").wait() == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        process = trackrelay("serve", "--port", str(port))

        assert process.wait() == 1
    assert re.search(r"^trackrelay: serve failed: .*Address already in use$", process.log, re.MULTILINE)
    assert "event=failed command=serve" in process.log
    assert "Traceback" not in process.log
