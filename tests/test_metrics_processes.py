"""``/metrics`` of a real ``trackrelay run --processes 2`` (issue 13): scraped during a load that
accepts, refuses and delivers, every counter equals what was sent, exactly, whichever of the
two receiver processes answered each request, and the worker's counts are in the same scrape.

The load is sent over many connections so that both receiver processes answer some of it; the
test checks that they did (each process writes its own file to the shared ``metrics_dir``)."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from http_sink import Answer, Recorded
from pipeline_harness import Database, Processes, ScriptedSink, event_ids, free_port, wait_for, webhook, \
    write_config

SAMPLE = re.compile(r"^(trackrelay_[a-z_]+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

TRACKS, BATCHES, BATCH_SIZE, INVALID, WRONG_KEY, DOOMED = 60, 10, 3, 7, 5, 4


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = frozenset(LABEL.findall(match.group(2) or ""))
            found[(match.group(1), labels)] = float(match.group(3))
    return found


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture
def processes(tmp_path: Path) -> Any:
    running = Processes(tmp_path)
    yield running
    running.kill_leftovers()


def test_two_receivers_and_the_worker_count_exactly_what_was_sent(
        tmp_path: Path, database_url: str, processes: Any, sink: ScriptedSink,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # "flaky" answers 500 to each event's first attempt and 200 to the next, except the doomed
    # events, answered 500 until they are dead (max_attempts 2): one retry and one dead each.
    doomed = {f"doomed-{i}" for i in range(DOOMED)}
    tried: Counter[str] = Counter()
    lock = threading.Lock()

    def decide(_: int, recorded: Recorded) -> Answer:
        if recorded.path != "/flaky":
            return Answer()
        (message_id,) = event_ids(recorded)
        with lock:
            tried[message_id] += 1
            first = tried[message_id] == 1
        return Answer(status=500) if first or message_id in doomed else Answer()

    sink.decide = decide
    port, admin_port = free_port(), free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    path = write_config(tmp_path / "t.toml", database_url,
                        [webhook(sink.url + "/good", name="good"),
                         webhook(sink.url + "/flaky", name="flaky", max_attempts=2)],
                        sources=[{"name": "web", "write_keys": ["k1"]}], receiver={"port": port})
    path.write_text(path.read_text() + f'\n[admin]\nport = {admin_port}\nmetrics_dir = "{metrics_dir}"\n')
    monkeypatch.delenv("TRACKRELAY_ADMIN_PORT")  # conftest turns the console off for every test
    run = processes.start("run", "--config", str(path), "--processes", "2")
    run.wait_for_log(r"event=started role=worker")
    wait_for(lambda: run.log.count("event=started role=receiver") == 2, "two receivers")

    url = f"http://127.0.0.1:{port}"
    statuses: Counter[tuple[str, int]] = Counter()
    ids = [f"t-{i}" for i in range(TRACKS - DOOMED)] + sorted(doomed)

    def send(route: str, body: dict[str, Any], key: str = "k1") -> None:
        # A new connection each time: the kernel spreads them over both processes' accepts.
        with httpx.Client() as client:
            status = client.post(url + route, json=body, auth=(key, ""), timeout=30).status_code
        with lock:
            statuses[(route, status)] += 1

    def load(part: int) -> None:
        for i in range(part, len(ids), 4):
            send("/v1/track", {"type": "track", "event": "E", "userId": "u", "messageId": ids[i]})
        for i in range(part, BATCHES, 4):
            send("/v1/batch", {"batch": [{"type": "track", "event": "B", "userId": "u",
                                          "messageId": f"b-{i}-{j}"} for j in range(BATCH_SIZE)]})
        for i in range(part, INVALID, 4):
            send("/v1/track", {"type": "track", "event": "no user", "messageId": f"x-{i}"})
        for i in range(part, WRONG_KEY, 4):
            send("/v1/track", {"type": "track", "event": "E", "userId": "u", "messageId": f"w-{i}"}, key="nope")

    threads = [threading.Thread(target=load, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    # A scrape while the load runs answers, and never shows more than was sent.
    during = scrape(admin_port)
    assert total(during, "trackrelay_http_requests_total") <= TRACKS + BATCHES + INVALID + WRONG_KEY
    for thread in threads:
        thread.join(60)
    # A key that is not configured is refused like any bad request (400, closed mode).
    assert statuses == {("/v1/track", 200): TRACKS, ("/v1/batch", 200): BATCHES,
                        ("/v1/track", 400): INVALID + WRONG_KEY}, statuses

    events = TRACKS + BATCHES * BATCH_SIZE
    db = Database(database_url)
    try:
        wait_for(lambda: db.states() == {"delivered": 2 * events - DOOMED, "dead": DOOMED}, "every delivery settled")
    finally:
        db.dispose()

    def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = scrape(admin_port)
        counted = total(samples, "trackrelay_delivery_attempts_total")
        requests = total(samples, "trackrelay_http_requests_total", route="track")
        # The receivers fold their counts once a second, the worker after each batch; the
        # database's figures are read at most every 5 s (receiver/admin/metrics.py).
        dead = value(samples, "trackrelay_deliveries", destination="flaky", state="dead")
        return samples if (counted, requests, dead) == (3 * events, TRACKS + INVALID + WRONG_KEY, DOOMED) else None

    samples = wait_for(settled, "every count folded into /metrics")

    # Requests, by route name and status, whichever process answered.
    assert value(samples, "trackrelay_http_requests_total", route="track", status="200") == TRACKS
    assert value(samples, "trackrelay_http_requests_total", route="batch", status="200") == BATCHES
    assert value(samples, "trackrelay_http_requests_total", route="track", status="400") == INVALID + WRONG_KEY
    assert value(samples, "trackrelay_request_duration_seconds_count", route="track") == TRACKS + INVALID + WRONG_KEY
    assert value(samples, "trackrelay_request_duration_seconds_count", route="batch") == BATCHES
    # Messages by source and outcome; refusals by reason (the sum is every refused request).
    assert value(samples, "trackrelay_messages_total", source="web", outcome="accepted") == events
    assert total(samples, "trackrelay_messages_total", outcome="rejected") == INVALID + WRONG_KEY
    assert value(samples, "trackrelay_messages_total", source="none", outcome="rejected") == WRONG_KEY
    reasons = {dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "trackrelay_rejected_total"}
    assert sorted(reasons.values()) == sorted([INVALID, WRONG_KEY]), reasons
    # Every row the receivers committed: each accepted request, and each refused one (recorded
    # in the rejected table through the same group commit).
    assert total(samples, "trackrelay_commit_rows_sum") == TRACKS + BATCHES + INVALID + WRONG_KEY
    # The worker's attempts, by destination and outcome, and the lag of each delivered one.
    assert value(samples, "trackrelay_delivery_attempts_total", destination="good", outcome="delivered") == events
    assert value(samples, "trackrelay_delivery_attempts_total", destination="flaky", outcome="retry") == events
    assert value(samples, "trackrelay_delivery_attempts_total", destination="flaky",
                 outcome="delivered") == events - DOOMED
    assert value(samples, "trackrelay_delivery_attempts_total", destination="flaky", outcome="dead") == DOOMED
    assert value(samples, "trackrelay_delivery_lag_seconds_count", destination="good") == events
    assert value(samples, "trackrelay_delivery_lag_seconds_count", destination="flaky") == events - DOOMED
    # The database's figures: nothing left to decode or deliver, the doomed ones dead.
    assert value(samples, "trackrelay_outbox_pending") == 0
    assert value(samples, "trackrelay_deliveries", destination="flaky", state="dead") == DOOMED
    for state in ("pending", "in_flight", "retrying"):
        assert value(samples, "trackrelay_deliveries", destination="flaky", state=state) == 0
        assert value(samples, "trackrelay_deliveries", destination="good", state=state) == 0

    # Both receiver processes answered some of the load: each wrote its own request counts.
    answered_by = {}
    for counts in metrics_dir.glob("counter_*.db"):
        served = sum(v for key, v, *_ in MmapedDict.read_all_values_from_file(str(counts))
                     if json.loads(key)[0] == "trackrelay_http_requests")
        if served:
            answered_by[counts.name] = served
    assert len(answered_by) == 2 and sum(answered_by.values()) == TRACKS + BATCHES + INVALID + WRONG_KEY, answered_by
