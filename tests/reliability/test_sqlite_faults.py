"""SQLite files that cannot take writes, under load from real ``trackrelay`` processes: a
read-only file (the receiver and worker running as an unprivileged user: root ignores file
modes) and a full disk (a small tmpfs). Writes are answered ``503`` with ``Retry-After`` and
``/health`` says they are failing; once the cause is gone the same processes recover by
themselves, and every event acknowledged is stored and delivered.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from http_sink import HttpSink
from reliability.outage_load import (SETTLE_SECONDS, Load, Trackrelay, by_status, check_answers_while_down,
                                     health, nothing_lost, owned_by, run_command, unprivileged_user,
                                     wait_answering, wait_delivered, write_config)
from pipeline_harness import free_port, wait_for

LOCK_TIMEOUT = 1.0
BOUND = LOCK_TIMEOUT + 5  # README, lock_timeout_seconds (see test_postgres_outage.py)
SLACK = 1.5


def needs(condition: bool, why: str) -> None:
    """A requirement of the test: failing under CI, skipped elsewhere."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def user_folder() -> Iterator[tuple[Path, list[str]]]:
    """A folder the unprivileged user owns (not under tmp_path, which that user cannot reach),
    and the command prefix that runs a process as that user."""
    prefix = unprivileged_user()
    needs(not prefix or shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to drop root")
    folder = Path(tempfile.mkdtemp(prefix="trackrelay-ro-"))
    folder.chmod(0o755)
    owned_by(prefix, folder)
    yield folder, prefix
    shutil.rmtree(folder, ignore_errors=True)


def modes(folder: Path, name: str) -> str:
    return " ".join(f"{p.name}={stat.S_IMODE(p.stat().st_mode):o}" for p in sorted(folder.glob(name + "*")))


def test_a_read_only_file_is_503_then_recovers_once_writable(user_folder: tuple[Path, list[str]],
                                                            figures: Callable[[str], None]) -> None:
    """The receiver opens a database file its user may not write (SQLite then opens it read-only,
    silently, and makes its -wal and -shm files read-only too); the operator makes the file
    writable again, and the receiver is not restarted."""
    folder, prefix = user_folder
    db = folder / "trackrelay.db"
    sink = HttpSink()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(folder, f"sqlite:///{db}", port, sink.url, LOCK_TIMEOUT)
    run_command("migrate", config, prefix)
    db.chmod(0o444)
    serve = Trackrelay("serve", config, folder / "serve.log", prefix)
    worker: Trackrelay | None = None
    load = Load(base)
    try:
        wait_answering(base, serve)
        down_from = time.monotonic()
        load.start()
        load.wait_answers(50, since=down_from)
        down_health = health(base)
        read_only_modes = modes(folder, db.name)
        down_until = time.monotonic()
        db.chmod(0o644)
        up = time.monotonic()
        recovered = load.wait_acked_since(up, timeout=15)
        load.wait_answers(100, since=up + recovered)
        up_health = health(base)
        load.finish()
        serve.alive()
        # The worker is started now: on a file it cannot write it refuses to start (exit 1).
        worker = Trackrelay("worker", config, folder / "worker.log", prefix)
        delivered = wait_delivered(sink, load.acked, worker)
    finally:
        load.finish(timeout=5)
        stopped = serve.stop(), worker.stop() if worker is not None else 0
        sink.stop()
    assert stopped == (0, 0), serve.log[-3000:] + (worker.log[-3000:] if worker is not None else "")

    # Nothing could be written while the file was read-only: no settling time.
    down, worst = check_answers_while_down(load, down_from - SETTLE_SECONDS, down_until, BOUND + SLACK)
    assert down_health[0] == 503 and "writes failing" in down_health[1], down_health
    assert up_health[0] == 200, up_health
    acked, stored = nothing_lost(load, f"sqlite:///{db}", delivered)
    figures(f"read-only file ({read_only_modes}), receiver as uid {os.stat(db).st_uid}: answers "
            f"{by_status(load.answers)}; while read-only {len(down):,} answers, all 503 with Retry-After, longest "
            f"{worst:.2f} s, /health 503 'writes failing'; first 200 {recovered:.2f} s after chmod 644, "
            f"/health 200; acked={len(acked):,} stored={len(stored):,} delivered={len(delivered):,}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for the test (root only), unmounted after: room for the WAL at its
    checkpoint size (1,000 pages), or the disk would be full again as soon as it is freed."""
    needs(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, timeout=30)
    needs(done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(path: Path) -> int:
    """Write ``path`` until the disk is full; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as filler:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            chunk = b"\0" * size
            while True:
                try:
                    written += filler.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def health_if_failing(base: str) -> tuple[int, str] | None:
    answer = health(base)
    return answer if answer[0] == 503 else None


def test_a_full_disk_is_503_then_recovers_once_space_is_freed(small_disk: Path, tmp_path: Path,
                                                               figures: Callable[[str], None]) -> None:
    db = small_disk / "trackrelay.db"
    sink = HttpSink()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, f"sqlite:///{db}", port, sink.url, LOCK_TIMEOUT)
    run = Trackrelay("run", config, tmp_path / "run.log")
    load = Load(base)
    try:
        wait_answering(base, run)
        load.start()
        load.wait_answers(100, since=0)
        filling = time.monotonic()
        filled = fill(small_disk / "filler")
        # SQLite writes into the WAL's pages already on disk first: the 503s begin once it must grow.
        wait_for(lambda: any(a.status == 503 for a in load.answers), "a 503 once the disk is full")
        first_503 = min(a.answered for a in load.answers if a.status == 503)
        load.wait_answers(50, since=first_503)
        wait_for(lambda: time.monotonic() - first_503 >= 2, "the disk to stay full 2 s")
        # A checkpoint can let SQLite restart its WAL in the space it has, so a commit may still
        # get through now and then (a true 200): /health must say 503 while the writes fail.
        down_health = wait_for(lambda: health_if_failing(base), "/health to say the writes are failing", 10)
        down_until = time.monotonic()
        (small_disk / "filler").unlink()
        up = time.monotonic()
        recovered = load.wait_acked_since(up, timeout=15)
        load.wait_answers(100, since=up + recovered)
        up_health = health(base)
        load.finish()
        run.alive()
        delivered = wait_delivered(sink, load.acked, run)
    finally:
        load.finish(timeout=5)
        stopped = run.stop()
        sink.stop()
    assert stopped == 0, run.log[-3000:]

    down, worst = check_answers_while_down(load, first_503, down_until, BOUND + SLACK)
    assert down_health[0] == 503 and "writes failing" in down_health[1], down_health
    assert up_health[0] == 200, up_health
    acked, stored = nothing_lost(load, f"sqlite:///{db}", delivered)
    figures(f"full disk (16 MB tmpfs, {filled:,} bytes of filler): answers {by_status(load.answers)}; first 503 "
            f"{first_503 - filling:.2f} s after filling began, then {len(down):,} answers, all 503 with "
            f"Retry-After, longest {worst:.2f} s, /health 503 'writes failing'; first 200 {recovered:.2f} s "
            f"after the filler went, /health 200; acked={len(acked):,} stored={len(stored):,} "
            f"delivered={len(delivered):,}")
