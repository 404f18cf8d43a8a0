"""The file destination: JSON lines, daily and size rotation, fsync before DELIVERED."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.destinations.base import DELIVERED, Outcome
from pipeline.destinations.file import FileDestination, FileOptions


def track(n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": f"m{n}", "userId": "u1", "event": "Signed Up",
            "properties": {"n": n}, "timestamp": "2026-11-26T10:00:00.000Z", **extra}


class Clock:
    """A settable UTC clock: the day a file is named after, without waiting for midnight."""

    def __init__(self, when: str) -> None:
        self.now = datetime.fromisoformat(when)

    def __call__(self) -> datetime:
        return self.now


def make(path: Path, clock: Clock | None = None, batch_size: int = 500, **options: Any) -> FileDestination:
    kwargs = {"clock": clock} if clock else {}
    destination = FileDestination("archive", FileOptions(path=str(path), **options), batch_size, **kwargs)
    asyncio.run(destination.start())
    return destination


def deliver(destination: FileDestination, events: list[dict[str, Any]]) -> list[Outcome]:
    return asyncio.run(destination.deliver(events))


def read_lines(path: Path) -> list[dict[str, Any]]:
    # A separate descriptor: what is there for any reader once deliver() has returned.
    with open(path, "rb") as file:
        return [orjson.loads(line) for line in file.read().splitlines()]


def test_lines_are_the_events_in_order(tmp_path: Path) -> None:
    destination = make(tmp_path / "out", Clock("2026-11-26T10:00:00+00:00"))
    events = [track(n) for n in range(5)]
    assert deliver(destination, events) == [DELIVERED] * 5
    assert deliver(destination, [track(5)]) == [DELIVERED]
    assert os.listdir(tmp_path / "out") == ["events-2026-11-26.jsonl"]
    assert read_lines(tmp_path / "out" / "events-2026-11-26.jsonl") == events + [track(5)]


def test_each_line_is_compact_json_ending_in_a_newline(tmp_path: Path) -> None:
    destination = make(tmp_path, Clock("2026-11-26T10:00:00+00:00"))
    deliver(destination, [{"type": "track", "messageId": "m1", "event": "é"}])
    assert (tmp_path / "events-2026-11-26.jsonl").read_bytes() == \
        '{"type":"track","messageId":"m1","event":"é"}\n'.encode()


def test_file_is_named_after_the_utc_day_of_writing(tmp_path: Path) -> None:
    # 23:30 in New York on the 26th is already the 27th in UTC.
    clock = Clock("2026-11-26T23:30:00-05:00")
    destination = make(tmp_path, clock, prefix="web")
    deliver(destination, [track(1)])
    clock.now = datetime(2026, 11, 28, 0, 0, 1, tzinfo=timezone.utc)
    deliver(destination, [track(2)])
    assert sorted(os.listdir(tmp_path)) == ["web-2026-11-27.jsonl", "web-2026-11-28.jsonl"]
    assert read_lines(tmp_path / "web-2026-11-27.jsonl") == [track(1)]
    assert read_lines(tmp_path / "web-2026-11-28.jsonl") == [track(2)]


def test_default_clock_names_the_file_after_today_in_utc(tmp_path: Path) -> None:
    destination = make(tmp_path)
    before = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    deliver(destination, [track(1)])
    after = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert os.listdir(tmp_path)[0] in {f"events-{before}.jsonl", f"events-{after}.jsonl"}


def test_start_creates_the_directory(tmp_path: Path) -> None:
    make(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_a_full_file_continues_in_numbered_files(tmp_path: Path) -> None:
    line_size = len(orjson.dumps(track(0))) + 1
    destination = make(tmp_path, Clock("2026-11-26T10:00:00+00:00"), max_bytes=2 * line_size)
    events = [track(n) for n in range(5)]
    assert deliver(destination, events) == [DELIVERED] * 5
    assert sorted(os.listdir(tmp_path)) == [
        "events-2026-11-26.1.jsonl", "events-2026-11-26.2.jsonl", "events-2026-11-26.jsonl"]
    assert read_lines(tmp_path / "events-2026-11-26.jsonl") == events[0:2]
    assert read_lines(tmp_path / "events-2026-11-26.1.jsonl") == events[2:4]
    assert read_lines(tmp_path / "events-2026-11-26.2.jsonl") == events[4:5]
    assert all(os.path.getsize(tmp_path / name) <= 2 * line_size for name in os.listdir(tmp_path))


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    destination = make(tmp_path, Clock("2026-11-26T10:00:00+00:00"), max_bytes=10)
    assert deliver(destination, [track(1), track(2)]) == [DELIVERED, DELIVERED]
    assert read_lines(tmp_path / "events-2026-11-26.jsonl") == [track(1)]
    assert read_lines(tmp_path / "events-2026-11-26.1.jsonl") == [track(2)]


def test_restart_continues_in_the_last_numbered_file(tmp_path: Path) -> None:
    line_size = len(orjson.dumps(track(0))) + 1
    clock = Clock("2026-11-26T10:00:00+00:00")
    first = make(tmp_path, clock, max_bytes=2 * line_size)
    deliver(first, [track(n) for n in range(3)])  # .jsonl full, .1.jsonl has one line
    (tmp_path / "events-2026-11-25.7.jsonl").write_bytes(b"")  # another day's files don't count
    (tmp_path / "other-2026-11-26.9.jsonl").write_bytes(b"")  # nor another prefix's
    restarted = make(tmp_path, clock, max_bytes=2 * line_size)
    assert deliver(restarted, [track(3), track(4)]) == [DELIVERED, DELIVERED]
    assert read_lines(tmp_path / "events-2026-11-26.1.jsonl") == [track(2), track(3)]
    assert read_lines(tmp_path / "events-2026-11-26.2.jsonl") == [track(4)]
    assert read_lines(tmp_path / "events-2026-11-26.jsonl") == [track(0), track(1)]


def test_restart_appends_to_the_days_file(tmp_path: Path) -> None:
    clock = Clock("2026-11-26T10:00:00+00:00")
    deliver(make(tmp_path, clock), [track(1)])
    deliver(make(tmp_path, clock), [track(2)])
    assert read_lines(tmp_path / "events-2026-11-26.jsonl") == [track(1), track(2)]


def test_file_and_new_directory_entry_are_fsynced_before_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def observed_fsync(fd: int) -> None:
        # Observe, then call through: the data must really reach the disk.
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    destination = make(tmp_path, Clock("2026-11-26T10:00:00+00:00"))
    path = tmp_path / "events-2026-11-26.jsonl"
    deliver(destination, [track(1)])
    size_after_first = path.stat().st_size
    assert synced == [(str(path), size_after_first), (str(tmp_path), synced[1][1])]
    deliver(destination, [track(2)])
    # The file existed: only the file is fsynced, after both lines were written.
    assert synced[2:] == [(str(path), path.stat().st_size)]
    assert path.stat().st_size > size_after_first


def test_each_chunk_of_batch_size_is_written_and_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_fsync = os.fsync

    def observed_fsync(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    destination = make(tmp_path, Clock("2026-11-26T10:00:00+00:00"), batch_size=2)
    events = [track(n) for n in range(5)]
    assert deliver(destination, events) == [DELIVERED] * 5
    line_size = len(orjson.dumps(track(0))) + 1
    assert sizes == [2 * line_size, 4 * line_size, 5 * line_size]
    assert read_lines(tmp_path / "events-2026-11-26.jsonl") == events


def test_unwritable_directory_means_retry_for_every_event(tmp_path: Path) -> None:
    destination = make(tmp_path / "out", Clock("2026-11-26T10:00:00+00:00"))
    (tmp_path / "out").rmdir()
    (tmp_path / "out").write_bytes(b"not a directory")
    outcomes = deliver(destination, [track(1), track(2)])
    assert [o.kind for o in outcomes] == ["retry", "retry"]
    assert outcomes[0].reason.startswith(f"writing {tmp_path / 'out'}: [Errno 20] Not a directory")
    assert outcomes[0] == outcomes[1]


def test_unwritable_directory_fails_the_health_check(tmp_path: Path) -> None:
    destination = make(tmp_path / "out")
    assert asyncio.run(destination.check()) is None
    (tmp_path / "out").rmdir()
    assert asyncio.run(destination.check()) == f"directory {tmp_path / 'out'} is missing or not writable"


def test_an_event_that_is_not_json_is_rejected_alone(tmp_path: Path) -> None:
    destination = make(tmp_path, Clock("2026-11-26T10:00:00+00:00"))
    outcomes = deliver(destination, [track(1), track(2, properties={"n": 2**70}), track(3)])
    assert [o.kind for o in outcomes] == ["delivered", "rejected", "delivered"]
    assert outcomes[1].reason == "cannot serialise event as JSON: Integer exceeds 64-bit range"
    assert read_lines(tmp_path / "events-2026-11-26.jsonl") == [track(1), track(3)]


@pytest.mark.parametrize("options, message", [
    ({"max_bytes": 0}, "file destination 'archive' max_bytes: must be at least 1"),
    ({"prefix": "a/b"}, "file destination 'archive' prefix: must be a non-empty file name part "
                        "without '/', got 'a/b'"),
])
def test_invalid_options_are_refused(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        FileDestination("archive", FileOptions(path=str(tmp_path), **options), 500)
    assert str(info.value) == message
