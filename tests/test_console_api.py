"""The console's admin API (receiver/admin/api.py) against a real receiver, the real worker and
a loopback sink, on SQLite and Postgres: every route and filter, keyset paging while events
arrive, replay, and the 400s that name the parameter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import unique_id
from console_harness import RunningConsole, with_console
from http_sink import Answer
from pipeline.schema import deliveries
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def console() -> Iterator[Callable[[Pipeline], RunningConsole]]:
    started: list[RunningConsole] = []

    def start(pipeline: Pipeline, token: str = "") -> RunningConsole:
        started.append(RunningConsole(with_console(pipeline.config, token=token)))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def send(pipeline: Pipeline, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = pipeline.receiver.post(path, body)
    assert answer.status_code == 200, answer.text
    return body


def failing_two_ways(pipeline_start: Callable[..., Pipeline], sink: ScriptedSink) -> Pipeline:
    """Destinations "good" (answers 200) and "bad" (answers 500 while ``sink.broken``; two
    attempts, then dead)."""
    sink.broken = True  # type: ignore[attr-defined]
    sink.decide = lambda n, r: Answer(500, b"down for maintenance") if r.path == "/bad" and sink.broken \
        else Answer()  # type: ignore[attr-defined]
    return pipeline_start([webhook(sink.url + "/good", name="good"),
                           webhook(sink.url + "/bad", name="bad", max_attempts=2)])


def walk(console: RunningConsole, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a listing, page by page through next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = console.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def test_every_listing_and_filter_matches_the_store(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                                     console: Callable[..., RunningConsole]) -> None:
    pipeline = failing_two_ways(start_pipeline, sink)
    sent = [send(pipeline, "/v1/track", {"userId": f"u{i % 3}", "event": "Signed Up" if i % 2 else "Clicked",
                                         "messageId": unique_id(), "writeKey": "secret-key-1"}) for i in range(9)]
    sent.append(send(pipeline, "/v1/identify", {"anonymousId": "anon-7", "messageId": unique_id(), "traits": {}}))
    wait_for(lambda: pipeline.db.settled(20), "20 deliveries to settle (10 delivered, 10 dead)")
    running = console(pipeline)

    overview = running.get("/api/overview").json()
    assert overview["destinations"]["good"]["dead"] == 0 and overview["destinations"]["good"]["pending"] == 0
    assert overview["destinations"]["bad"]["dead"] == 10
    assert "500" in overview["destinations"]["bad"]["last_error"]
    assert overview["destinations"]["good"]["last_error"] is None
    assert overview["outbox_pending"] == 0 and overview["destinations"]["bad"]["configured"] is True

    dead = walk(running, "/api/deliveries", destination="bad", state="dead", limit=3)
    stored = [r for r in pipeline.db.deliveries("bad")]
    assert [d["id"] for d in dead] == sorted((r["id"] for r in stored), reverse=True)  # newest first, no gaps
    assert {d["message_id"] for d in dead} == {m["messageId"] for m in sent}
    assert all(d["attempts"] == 2 and "500" in d["last_error"] and d["state"] == "dead" for d in dead)
    assert walk(running, "/api/deliveries", destination="good", state="dead") == []
    assert len(walk(running, "/api/deliveries", state="delivered")) == 10

    signed_up = {m["messageId"] for m in sent if m.get("event") == "Signed Up"}
    by_event = walk(running, "/api/deliveries", event="Signed Up")
    assert {d["message_id"] for d in by_event} == signed_up and len(by_event) == 2 * len(signed_up)
    u1 = {m["messageId"] for m in sent if m.get("userId") == "u1"}
    assert {d["message_id"] for d in walk(running, "/api/deliveries", user_id="u1")} == u1
    anonymous = walk(running, "/api/deliveries", user_id="anon-7", type="identify")
    assert len(anonymous) == 2 and {d["type"] for d in anonymous} == {"identify"}
    assert walk(running, "/api/deliveries", type="page") == []
    assert walk(running, "/api/deliveries", since="1h", until="2099-01-01T00:00:00Z", destination="good",
                limit=500).__len__() == 10
    assert walk(running, "/api/deliveries", until="2000-01-01") == []

    detail = running.get(f"/api/events/{sent[0]['messageId']}").json()
    assert detail["event"]["payload"]["messageId"] == sent[0]["messageId"]
    assert detail["event"]["user_id"] == "u0" and detail["event"]["type"] == "track"
    assert "secret-key-1" not in running.get(f"/api/events/{sent[0]['messageId']}").text
    assert '"writeKey":"<masked>"' in detail["request"]["body"] and detail["request"]["route"] == "track"
    history = {d["destination"]: d for d in detail["deliveries"]}
    assert history["good"]["state"] == "delivered" and history["bad"]["state"] == "dead"
    assert history["bad"]["attempts"] == 2 and "500" in history["bad"]["last_error"]
    assert running.get("/api/events/no-such-id").status_code == 404
    assert running.get(f"/api/events/{sent[0]['messageId']}", params={"source": "elsewhere"}).status_code == 404

    minutes = running.get("/api/throughput", params={"minutes": 10}).json()["minutes"]
    assert len(minutes) == 10
    assert sum(m["accepted"] for m in minutes) == 10
    assert sum(m["delivered"] for m in minutes) == 10 and sum(m["dead"] for m in minutes) == 10


def test_replay_by_filter_by_ids_and_dry_run(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                             console: Callable[..., RunningConsole]) -> None:
    pipeline = failing_two_ways(start_pipeline, sink)
    for i in range(6):
        send(pipeline, "/v1/track" if i < 4 else "/v1/page", {"userId": "u", "event": "E", "messageId": unique_id()})
    wait_for(lambda: pipeline.db.settled(12), "12 deliveries to settle")
    running = console(pipeline)
    assert running.post("/api/replay", json={"destination": "bad", "dry_run": True}).json() == {"matched": 6}
    assert running.post("/api/replay", json={"destination": "bad", "type": "page", "dry_run": True}
                        ).json() == {"matched": 2}
    assert pipeline.db.states("bad") == {"dead": 6}  # a dry run changes nothing
    sink.broken = False  # type: ignore[attr-defined]
    one = walk(running, "/api/deliveries", destination="bad", state="dead")[0]
    assert running.post("/api/replay", json={"ids": [one["id"]]}).json() == {"matched": 1, "replayed": 1}
    wait_for(lambda: pipeline.db.states("bad") == {"dead": 5, "delivered": 1}, "the one replayed to be delivered")
    assert running.post("/api/replay", json={"destination": "bad", "state": "dead"}).json() == {
        "matched": 5, "replayed": 5}
    wait_for(lambda: pipeline.db.states("bad") == {"delivered": 6}, "all six to be delivered")
    assert sum(1 for r, _, a in sink.answered if r.path == "/bad" and a.status == 200) == 6
    assert running.post("/api/replay", json={"destination": "bad"}).json() == {"matched": 0, "replayed": 0}


def test_keyset_pages_stay_stable_while_new_events_arrive(start_pipeline: Callable[..., Pipeline],
                                                          sink: ScriptedSink,
                                                          console: Callable[..., RunningConsole]) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/good", name="good")])
    for _ in range(7):
        send(pipeline, "/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()})
    wait_for(lambda: pipeline.db.settled(7), "7 deliveries")
    running = console(pipeline)
    before = sorted((r["id"] for r in pipeline.db.deliveries()), reverse=True)
    first = running.get("/api/deliveries", params={"limit": 3}).json()
    for _ in range(5):  # arrive between the pages: newer, so on no page after the first
        send(pipeline, "/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()})
    wait_for(lambda: pipeline.db.settled(12), "12 deliveries")
    rest = walk(running, "/api/deliveries", limit=3, cursor=first["next_cursor"])
    assert [d["id"] for d in first["items"]] + [d["id"] for d in rest] == before
    assert len(walk(running, "/api/deliveries", limit=5)) == 12


def test_rejected_requests_are_listed_with_their_reason_and_masked_input(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink, console: Callable[..., RunningConsole]) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/good", name="good")])
    assert pipeline.receiver.post("/v1/track", b'{"writeKey": "leaky-key", "userId": ').status_code == 400
    assert pipeline.receiver.post("/v1/track", {"event": "no user", "writeKey": "leaky-key"}).status_code == 400
    assert pipeline.receiver.post("/v1/identify", b'{"userId": 1e400}').status_code == 400
    running = console(pipeline)
    items = wait_for(lambda: len(walk(running, "/api/rejected")) == 3 and walk(running, "/api/rejected"),
                     "three rejected rows")
    assert [i["route"] for i in items] == ["identify", "track", "track"]  # newest first
    assert all(i["status"] == 400 and i["reason"] and i["message"] for i in items)
    assert "leaky-key" not in running.get("/api/rejected").text
    assert any('"writeKey": "<masked>"' in (i["raw_start"] or "") for i in items)
    reason = items[-1]["reason"]
    assert {i["id"] for i in walk(running, "/api/rejected", reason=reason)} == \
        {i["id"] for i in items if i["reason"] == reason}
    assert len(walk(running, "/api/rejected", route="track", limit=1)) == 2
    assert walk(running, "/api/rejected", since="2099-01-01") == []


@pytest.mark.parametrize("path, params, named", [
    ("/api/deliveries", {"state": "lost"}, "state"),
    ("/api/deliveries", {"type": "click"}, "type"),
    ("/api/deliveries", {"limit": "0"}, "limit"),
    ("/api/deliveries", {"limit": "many"}, "limit"),
    ("/api/deliveries", {"since": "yesterday"}, "since"),
    ("/api/deliveries", {"until": "2026-13-45"}, "until"),
    ("/api/deliveries", {"cursor": "abc"}, "cursor"),
    ("/api/deliveries", {"userid": "u1"}, "userid"),
    ("/api/rejected", {"limit": "501"}, "limit"),
    ("/api/throughput", {"minutes": "100000"}, "minutes"),
])
def test_a_bad_filter_is_a_400_naming_the_parameter(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                                    console: Callable[..., RunningConsole], path: str,
                                                    params: dict[str, str], named: str) -> None:
    running = console(start_pipeline([webhook(sink.url + "/good", name="good")]))
    answer = running.get(path, params=params)
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["error"].startswith(f"{named}: ")


@pytest.mark.parametrize("body, named", [
    ({}, "destination"),
    ({"destination": "bad", "state": "gone"}, "state"),
    ({"ids": []}, "ids"),
    ({"ids": ["1"]}, "ids"),
    ({"destination": "bad", "dry_run": "perhaps"}, "dry_run"),
    ({"destination": "bad", "since": "soon"}, "since"),
    ({"destination": "bad", "everything": True}, "everything"),
])
def test_a_bad_replay_is_a_400_naming_the_field(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                                console: Callable[..., RunningConsole], body: dict[str, Any],
                                                named: str) -> None:
    running = console(start_pipeline([webhook(sink.url + "/good", name="good")]))
    answer = running.post("/api/replay", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(f"{named}: ")


def test_an_unknown_api_route_is_a_json_404(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                             console: Callable[..., RunningConsole]) -> None:
    running = console(start_pipeline([webhook(sink.url + "/good", name="good")]))
    answer = running.get("/api/nothing")
    assert answer.status_code == 404 and answer.json()["status"] == 404


def test_replayed_rows_are_the_ones_the_filter_matched(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                                       console: Callable[..., RunningConsole]) -> None:
    """A replay by ids leaves a delivery of another destination alone even if its id is given."""
    pipeline = failing_two_ways(start_pipeline, sink)
    send(pipeline, "/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()})
    wait_for(lambda: pipeline.db.settled(2), "two deliveries")
    running = console(pipeline)
    ids = [r["id"] for r in pipeline.db.deliveries()]
    answer = running.post("/api/replay", json={"ids": ids, "destination": "bad"}).json()
    assert answer == {"matched": 1, "replayed": 1}  # the delivered one of "good" is not dead or pending
    with pipeline.db.engine.connect() as conn:
        good = conn.execute(sa.select(deliveries.c.state).where(deliveries.c.destination == "good")).scalar_one()
    assert good == "delivered"


def test_an_orphaned_destination_is_shown_and_its_deliveries_discarded(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    pipeline = failing_two_ways(start_pipeline, sink)
    for _ in range(3):
        send(pipeline, "/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()})
    wait_for(lambda: pipeline.db.settled(6), "six deliveries to settle")
    # "bad" is taken out of the configuration the console sees (as after a reload)
    config = dataclasses.replace(pipeline.config,
                                 destinations=tuple(d for d in pipeline.config.destinations if d.name == "good"))
    running = RunningConsole(with_console(config))
    try:
        overview = running.get("/api/overview").json()
        assert overview["destinations"]["bad"]["configured"] is False
        assert running.get("/api/orphans").json() == {"orphans": [{"name": "bad", "pending": 0, "dead": 3}]}
        assert "Orphaned destinations" in running.get("/failures").text
        refused = running.post("/api/orphans/discard", json={"destination": "good"})
        assert refused.status_code == 400 and refused.json()["error"].startswith("destination: ")
        assert running.post("/api/orphans/discard", json={"destination": "bad", "dry_run": True}).json() == {
            "matched": 3}
        assert running.post("/api/orphans/discard", json={"destination": "bad"}).json() == {
            "matched": 3, "discarded": 3}
        assert running.get("/api/orphans").json() == {"orphans": []}
        assert pipeline.db.states("bad") == {} and pipeline.db.states("good") == {"delivered": 3}
    finally:
        running.stop()
