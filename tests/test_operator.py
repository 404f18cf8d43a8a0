"""The operator commands, run in-process through receiver.cli.main: ``trackrelay replay`` (dead,
by type, by time, pending-but-not-leased, from the outbox, dry runs, usage errors) and
``trackrelay status``; and pipeline.operations.parse_moment."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from pipeline.controllers import STALE_MS, publish
from pipeline.decoder import Decoder
from pipeline.destinations.concurrency import Snapshot
from pipeline.operations import parse_moment
from pipeline.queue import DeliveryQueue
from pipeline.store import Store, now_ms
from pipeline_harness import read_config, write_config
from receiver.cli import main
from stored_rows import add_delivery, add_event, insert_rows, opened_store, outbox_row, rows

HOUR_MS = 3_600_000
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


@pytest.fixture
def config_path(tmp_path: Path, database_url: str) -> Path:
    return write_config(tmp_path / "trackrelay.toml", database_url,
                        [{"name": "hook", "type": "null"}, {"name": "warehouse", "type": "null"}])


@pytest.fixture
def trackrelay(config_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Run]:
    """``trackrelay(*args)`` -> (exit status, stdout, stderr), with the test's config file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--config", str(config_path)])
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    root.handlers[:] = handlers  # main() configures logging for a process; undo it for pytest
    root.setLevel(level)


def add_identify(store: Store, message_id: str) -> int:
    (event_id,) = insert_rows(store, "events", [{
        "source": "default", "message_id": message_id, "type": "identify", "event_name": None, "outbox_id": None,
        "received_at_ms": now_ms(), "payload": b'{"type": "identify"}'}])
    return event_id


def dead(store: Store, event_id: int, destination: str = "hook") -> int:
    return add_delivery(store, event_id, destination, state="dead", attempts=10, finished_at_ms=now_ms())


def by_id(store: Store) -> dict[int, dict[str, Any]]:
    return {d["id"]: d for d in rows(store, "deliveries")}


def states(store: Store, ids: list[int]) -> list[tuple[str, int]]:
    found = by_id(store)
    return [(found[i]["state"], found[i]["attempts"]) for i in ids]


def iso(ms: int, offset_hours: int = 0) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone(timedelta(hours=offset_hours))).isoformat()


# --- replay of deliveries ------------------------------------------------------------------------

def test_replay_puts_the_destinations_dead_deliveries_back_to_pending(store: Store, trackrelay: Run) -> None:
    hook = [dead(store, add_event(store, f"m{i}")) for i in range(2)]
    other = dead(store, add_event(store, "w"), "warehouse")

    assert trackrelay("replay", "--destination", "hook") == (0, "replayed 2 dead deliveries to hook\n", "")

    assert states(store, hook + [other]) == [("pending", 0), ("pending", 0), ("dead", 10)]
    assert all(by_id(store)[i]["finished_at_ms"] is None and by_id(store)[i]["next_attempt_at_ms"] <= now_ms()
               for i in hook)


def test_replay_dry_run_counts_and_changes_nothing(store: Store, trackrelay: Run) -> None:
    for i in range(3):
        dead(store, add_event(store, f"m{i}"))
    dead(store, add_event(store, "w"), "warehouse")
    add_delivery(store, add_event(store, "sent"), state="delivered", finished_at_ms=now_ms())
    before = rows(store, "deliveries")

    assert trackrelay("replay", "--destination", "hook", "--dry-run") == \
        (0, "would replay 3 dead deliveries to hook\n", "")

    assert rows(store, "deliveries") == before


def test_replay_of_one_type_leaves_the_others_dead(store: Store, trackrelay: Run) -> None:
    tracks = [dead(store, add_event(store, f"t{i}")) for i in range(2)]
    identify = dead(store, add_identify(store, "i1"))

    assert trackrelay("replay", "--destination", "hook", "--type", "track") == \
        (0, "replayed 2 dead deliveries to hook\n", "")

    assert states(store, tracks + [identify]) == [("pending", 0), ("pending", 0), ("dead", 10)]


SINCE_UNTIL = {
    "since_duration": (lambda now: ["--since", "2h"], [1, 2]),
    "until_duration": (lambda now: ["--until", "90m"], [0]),
    "iso_with_offsets": (lambda now: ["--since", iso(now - 4 * HOUR_MS, 2), "--until", iso(now - HOUR_MS // 2)],
                         [0, 1]),
}


@pytest.mark.parametrize("args,replayed", SINCE_UNTIL.values(), ids=SINCE_UNTIL.keys())
def test_since_and_until_select_by_the_time_the_event_was_received(
        store: Store, trackrelay: Run, args: Callable[[int], list[str]], replayed: list[int]) -> None:
    now = now_ms()
    ids = [dead(store, add_event(store, f"m{i}", received_at_ms=now - ago))
           for i, ago in enumerate([3 * HOUR_MS, HOUR_MS, 0])]

    assert trackrelay("replay", "--destination", "hook", *args(now)) == \
        (0, f"replayed {len(replayed)} dead deliveries to hook\n", "")

    assert states(store, ids) == [("pending", 0) if i in replayed else ("dead", 10) for i in range(3)]


def test_replay_of_pending_deliveries_leaves_a_leased_one_alone(store: Store, trackrelay: Run) -> None:
    leased = add_delivery(store, add_event(store, "in-flight"), next_attempt_at_ms=now_ms() - 1000)
    DeliveryQueue(store, "w1").claim("hook", 1, 60_000)
    waiting = add_delivery(store, add_event(store, "retrying"), attempts=3, next_attempt_at_ms=now_ms() + HOUR_MS)
    leased_before = by_id(store)[leased]

    assert trackrelay("replay", "--destination", "hook", "--state", "pending") == \
        (0, "replayed 1 pending deliveries to hook\n", "")

    assert by_id(store)[leased] == leased_before
    assert leased_before["locked_by"].startswith("w1:") and leased_before["attempts"] == 1
    retried = by_id(store)[waiting]
    assert (retried["state"], retried["attempts"], retried["next_attempt_at_ms"] <= now_ms()) == ("pending", 0, True)


# --- replay from the outbox ----------------------------------------------------------------------

def test_replay_from_the_outbox_plans_deliveries_for_decoded_rows_only(
        store: Store, trackrelay: Run, config_path: Path) -> None:
    now = now_ms()
    store.append([
        outbox_row({"batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "recent-track"},
                              {"type": "identify", "userId": "u", "messageId": "recent-identify"}]},
                   received_at_ms=now - 10 * 60_000),
        outbox_row({"type": "track", "event": "E", "userId": "u", "messageId": "old-track"}, "track",
                   received_at_ms=now - 2 * HOUR_MS),
    ])
    Decoder(store, read_config(config_path)).decode_pending()  # both rows done: 3 events, 6 deliveries
    store.append([outbox_row({"type": "track", "event": "E", "userId": "u", "messageId": "not-decoded"}, "track")])
    before = rows(store, "deliveries")

    assert trackrelay("replay", "--destination", "hook", "--from-outbox", "--since", "1h", "--dry-run") == \
        (0, "would replay 2 events from the outbox to hook\n", "")
    assert rows(store, "deliveries") == before

    assert trackrelay("replay", "--destination", "hook", "--from-outbox", "--since", "1h", "--type", "track") == \
        (0, "replayed 1 events from the outbox to hook\n", "")
    assert trackrelay("replay", "--destination", "hook", "--from-outbox", "--since", "1h") == \
        (0, "replayed 2 events from the outbox to hook\n", "")

    message_ids = {e["id"]: e["message_id"] for e in rows(store, "events")}
    added = [(message_ids[d["event_id"]], d["destination"], d["state"]) for d in rows(store, "deliveries")[6:]]
    # Deduplication does not stop an explicit replay: the stored events are delivered again.
    assert added == [("recent-track", "hook", "pending"), ("recent-track", "hook", "pending"),
                     ("recent-identify", "hook", "pending")]
    assert [r["state"] for r in rows(store, "outbox")] == ["done", "done", "pending"]
    assert "not-decoded" not in message_ids.values()


USAGE_ERRORS = {
    "from_outbox_without_since": (["--destination", "hook", "--from-outbox"],
                                  "trackrelay: replay: --from-outbox needs --since and takes no --state\n"),
    "from_outbox_with_state": (["--destination", "hook", "--from-outbox", "--since", "1h", "--state", "dead"],
                               "trackrelay: replay: --from-outbox needs --since and takes no --state\n"),
    "unknown_destination": (["--destination", "nope"],
                            "trackrelay: replay: no destination named 'nope' (hook, warehouse)\n"),
    "bad_since": (["--destination", "hook", "--since", "yesterday"],
                  "trackrelay: replay: 'yesterday' is neither an ISO-8601 time nor a duration like 90m, 2h, 3d\n"),
    "bad_until": (["--destination", "hook", "--until", "2h ago"],
                  "trackrelay: replay: '2h ago' is neither an ISO-8601 time nor a duration like 90m, 2h, 3d\n"),
}


@pytest.mark.parametrize("args,message", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_replay_usage_errors_exit_2_and_change_nothing(store: Store, trackrelay: Run, args: list[str],
                                                       message: str) -> None:
    dead(store, add_event(store, "m1"))
    store.append([outbox_row({"type": "track", "event": "E", "userId": "u"}, "track", state="done")])
    before = rows(store, "deliveries")

    assert trackrelay("replay", *args) == (2, "", message)

    assert rows(store, "deliveries") == before


# --- status --------------------------------------------------------------------------------------

def test_status_prints_a_row_per_destination_and_the_outbox_and_rejected_counts(
        store: Store, trackrelay: Run) -> None:
    now = now_ms()
    add_delivery(store, add_event(store, "in-flight"), created_at_ms=now - 120_000, next_attempt_at_ms=now - 1000)
    DeliveryQueue(store, "w1").claim("hook", 1, 60_000)
    add_delivery(store, add_event(store, "new"), created_at_ms=now - 5000)
    add_delivery(store, add_event(store, "retrying"), attempts=2, next_attempt_at_ms=now + HOUR_MS)
    for i in range(2):
        dead(store, add_event(store, f"dead{i}"))
    add_delivery(store, add_event(store, "sent"), state="delivered", finished_at_ms=now)
    add_delivery(store, add_event(store, "sent-long-ago"), state="delivered", finished_at_ms=now - 2 * HOUR_MS)
    add_delivery(store, add_event(store, "warehoused"), "warehouse", state="delivered", finished_at_ms=now)
    dead(store, add_event(store, "removed"), "legacy")  # a destination no longer configured
    store.append([outbox_row({}, state="pending"), outbox_row({}, state="done"),
                  outbox_row({}, state="failed"), outbox_row({}, state="failed")])
    insert_rows(store, "rejected", [{"received_at_ms": at, "route": "batch", "source": None, "status": 400,
                                     "code": "invalid_json", "reason": "bad"}
                                    for at in (now, now - 60_000, now - 3 * HOUR_MS)])

    # Two workers' controllers for the hook (summed), and one that stopped reporting long ago.
    snapshot = Snapshot("adaptive", 12, 256, 3, 48.0, 40.0, 1, 2)
    publish(store, "host:1", {"hook": snapshot}, now)
    publish(store, "host:2", {"hook": dataclasses.replace(snapshot, limit=20, rtt_ms=52.0)}, now - 1000)
    publish(store, "host:3", {"hook": snapshot, "warehouse": snapshot}, now - STALE_MS - 1000)

    code, out, err = trackrelay("status")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split() for line in lines[:4]] == [
        ["destination", "pending", "in_flight", "retrying", "dead", "delivered_1h", "oldest_pending",
         "concurrency", "rtt"],
        ["hook", "1", "1", "1", "2", "1", lines[1].split()[-3], "32/512", "50.0ms"],
        ["legacy", "(orphaned)", "0", "0", "0", "1", "0", "-", "-", "-"],
        ["warehouse", "0", "0", "0", "0", "1", "-", "-", "-"],
    ]
    oldest = lines[1].split()[-3]
    assert oldest.endswith("s") and 120.0 <= float(oldest[:-1]) < 180.0
    starts = [lines[0].index(name) for name in lines[0].split()]
    # aligned (the orphan's name cell holds a space: "legacy (orphaned)")
    assert all([line[start:].split()[0] for start in starts] == line.split() for line in lines[:4] if "(" not in line)
    assert [lines[2][start:].split()[0] for start in starts[1:]] == ["0", "0", "0", "1", "0", "-", "-", "-"]
    assert lines[4:] == ["outbox pending: 1, failed to decode: 2", "rejected: 3 (last hour: 2)",
                         "orphaned (not configured; their deliveries wait until configured again or "
                         "`trackrelay discard --destination NAME`): legacy"]


# --- parse_moment --------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
NOW_MS = int(NOW.timestamp() * 1000)

MOMENTS = {
    "seconds": ("45s", NOW_MS - 45_000),
    "minutes": ("90m", NOW_MS - 90 * 60_000),
    "hours": ("2h", NOW_MS - 2 * HOUR_MS),
    "fractional_hours": ("1.5h", NOW_MS - 90 * 60_000),
    "days": ("3d", NOW_MS - 3 * 24 * HOUR_MS),
    "weeks": ("1w", NOW_MS - 7 * 24 * HOUR_MS),
    "spaces": (" 2h ", NOW_MS - 2 * HOUR_MS),
    "iso_z": ("2024-04-30T06:00:00Z", NOW_MS - 30 * HOUR_MS),
    "iso_offset": ("2024-04-30T08:00:00+02:00", NOW_MS - 30 * HOUR_MS),
    "iso_negative_offset": ("2024-04-30T01:00:00.250-05:00", NOW_MS - 30 * HOUR_MS + 250),
    "iso_without_offset_is_utc": ("2024-04-30T06:00:00", NOW_MS - 30 * HOUR_MS),
}


@pytest.mark.parametrize("text,expected", MOMENTS.values(), ids=MOMENTS.keys())
def test_parse_moment_reads_durations_back_from_now_and_iso_times(text: str, expected: int) -> None:
    assert parse_moment(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2x", "-2h", "h", "", "2 h"])
def test_parse_moment_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_moment(text, now=NOW)
    assert str(caught.value) == f"{text!r} is neither an ISO-8601 time nor a duration like 90m, 2h, 3d"
