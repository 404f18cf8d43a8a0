"""End to end: a real receiver and the real worker deliver to a real loopback HTTP sink.

Events go in through the real client libraries or raw HTTP, come out of the sink normalised
(messageId, ISO-8601 millisecond Z times, receivedAt, context.ip, no writeKey), each once; a
resent batch is delivered once; batch context is merged; the integrations object and the
webhook ``?writeKey=`` override route them. ``trackrelay run`` does it all as real processes.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient

from conftest import unique_id
from pipeline.messages import parse_timestamp
from pipeline.normalise import iso_ms
from pipeline_harness import ISO_MS_Z, Pipeline, Processes, ScriptedSink, free_port, wait_for, webhook, write_config

WRITE_KEY = "ILoveData123"
TIME_KEYS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")


def track(user: str = "u1", **fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "userId": user, "messageId": unique_id(), **fields}


def by_id(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {e["messageId"]: e for e in events}
    assert len(found) == len(events), "a messageId was delivered more than once"
    return found


# --- the real client libraries -----------------------------------------------------------------

@pytest.mark.clients
@pytest.mark.parametrize("library", ["segment", "rudder"])
def test_events_sent_with_a_client_library_arrive_normalised_once_each(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink, library: str) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/in")])
    errors: list[Exception] = []
    cls = {"segment": SegmentClient, "rudder": RudderClient}[library]
    client = cls(WRITE_KEY, host=pipeline.receiver.url, max_retries=2, timeout=5, upload_interval=0.1,
                 on_error=lambda error, batch: errors.append(error))
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    try:
        calls = [
            client.identify(user_id="u1", traits={"plan": "pro"}),
            client.track(user_id="u1", event="Signed Up", properties={"n": 1}, timestamp=an_hour_ago),
            client.page(user_id="u1", category="Docs", name="Install"),
            client.screen(user_id="u1", name="Home"),
            client.group(user_id="u1", group_id="g1", traits={"name": "ACME"}),
            client.alias(previous_id="anon-1", user_id="u1"),
        ]
        client.flush()
    finally:
        client.join()
    assert errors == []
    assert [ok for ok, _ in calls] == [True] * 6
    sent = {m["messageId"]: json.loads(json.dumps(m, default=str)) for _, m in calls}

    wait_for(lambda: pipeline.db.settled(6), "six deliveries to settle")
    delivered = by_id(sink.events("/in"))
    assert set(delivered) == set(sent)
    assert sink.counts() == {message_id: 1 for message_id in sent}
    received_at = {iso_ms(datetime.fromtimestamp(r["received_at_ms"] / 1000, tz=timezone.utc))
                   for r in pipeline.receiver.outbox()}
    for message_id, message in sent.items():
        event = delivered[message_id]
        assert "writeKey" not in event
        assert all(ISO_MS_Z.match(event[key]) for key in TIME_KEYS), event
        assert event["receivedAt"] in received_at
        assert event["originalTimestamp"] == iso_ms(parse_timestamp(message["timestamp"]))
        # Clock-skew correction: receivedAt - (sentAt - originalTimestamp), to the millisecond
        # (each time was cut to milliseconds on its own, hence the 2 ms of slack).
        times = {key: parse_timestamp(event[key]) for key in TIME_KEYS}
        expected = times["receivedAt"] - (times["sentAt"] - times["originalTimestamp"])
        assert abs(times["timestamp"] - expected) <= timedelta(milliseconds=2)
        assert event["context"] == {**message["context"], "ip": "127.0.0.1"}
        assert event["context"]["library"]["name"] == "analytics-python"
        rest = {k: v for k, v in event.items() if k not in (*TIME_KEYS, "context")}
        assert rest == {k: v for k, v in message.items() if k not in ("timestamp", "context", "writeKey")}
    assert delivered[calls[1][1]["messageId"]]["timestamp"] < delivered[calls[0][1]["messageId"]]["timestamp"]
    assert pipeline.db.states() == {"delivered": 6}


# --- raw HTTP ------------------------------------------------------------------------------------

def test_a_batch_sent_twice_is_delivered_once(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/in", batch_size=10)])
    batch = {"batch": [track("u1"), track("u2"), {"type": "identify", "userId": "u3", "messageId": unique_id()}]}

    first = pipeline.receiver.post("/v1/batch", batch)
    wait_for(lambda: pipeline.db.settled(3), "the first copy to be delivered")
    # Concurrent delivery lanes may split the three events over more than one request.
    requests_for_first_copy = len(sink.answered)
    second = pipeline.receiver.post("/v1/batch", batch)

    assert (first.status_code, first.json()) == (200, {"Success": True})
    assert (second.status_code, second.json()) == (200, {"Success": True})
    wait_for(lambda: pipeline.db.outbox_pending() == 0 and len(pipeline.receiver.outbox()) == 2,
             "both copies to be decoded")
    # The second copy was decoded into nothing: no event, no delivery, so nothing to send.
    assert wait_for(lambda: pipeline.db.settled(3), "deliveries to settle")
    assert len(pipeline.db.events()) == 3
    assert sink.counts() == {m["messageId"]: 1 for m in batch["batch"]}
    assert len(sink.answered) == requests_for_first_copy


def test_batch_level_context_integrations_and_sent_at_are_merged_into_each_message(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/in")])
    own = track("u1", context={"app": {"version": "2.0"}, "ip": "203.0.113.9"}, integrations={"Amplitude": True},
                timestamp="2026-01-01T10:00:00+01:00", sentAt="2026-01-01T09:00:05Z")
    bare = track("u2", timestamp="2026-01-01T09:00:00Z", writeKey=WRITE_KEY)
    body = {"batch": [own, bare], "sentAt": "2026-01-01T09:00:10.5Z", "writeKey": WRITE_KEY,
            "context": {"app": {"name": "Shop", "version": "1.0"}, "locale": "fr-FR"},
            "integrations": {"All": True, "Amplitude": False, "Mixpanel": False}}

    assert pipeline.receiver.post("/v1/batch", body).status_code == 200
    wait_for(lambda: pipeline.db.settled(2), "two deliveries to settle")

    delivered = by_id(sink.events())
    first, second = delivered[own["messageId"]], delivered[bare["messageId"]]
    assert first["context"] == {"app": {"name": "Shop", "version": "2.0"}, "locale": "fr-FR", "ip": "203.0.113.9"}
    assert second["context"] == {"app": {"name": "Shop", "version": "1.0"}, "locale": "fr-FR", "ip": "127.0.0.1"}
    assert first["integrations"] == {"All": True, "Amplitude": True, "Mixpanel": False}
    assert second["integrations"] == {"All": True, "Amplitude": False, "Mixpanel": False}
    assert (first["originalTimestamp"], first["sentAt"]) == ("2026-01-01T09:00:00.000Z", "2026-01-01T09:00:05.000Z")
    assert (second["originalTimestamp"], second["sentAt"]) == ("2026-01-01T09:00:00.000Z", "2026-01-01T09:00:10.500Z")
    # timestamp = receivedAt - (sentAt - originalTimestamp): 5 s and 10.5 s before receivedAt.
    for event, skew in ((first, 5000), (second, 10500)):
        received = parse_timestamp(event["receivedAt"])
        assert event["timestamp"] == iso_ms(received - timedelta(milliseconds=skew))
    assert "writeKey" not in first and "writeKey" not in second


def test_integrations_false_keeps_an_event_from_that_destination_and_not_from_others(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/hook"),
                               webhook(sink.url + "/other", name="other", aliases=["Mixpanel"])])
    plain = track("plain")
    no_hook = track("no-hook", integrations={"hook": False})
    no_mixpanel = track("no-mixpanel", integrations={"Mixpanel": False})
    only_other = track("only-other", integrations={"All": False, "other": {"key": "x"}})
    nowhere = track("nowhere", integrations={"All": False})

    response = pipeline.receiver.post("/v1/batch", {"batch": [plain, no_hook, no_mixpanel, only_other, nowhere]})
    assert response.status_code == 200
    wait_for(lambda: pipeline.db.settled(5), "five deliveries to settle")

    assert sink.counts("/hook") == {plain["messageId"]: 1, no_mixpanel["messageId"]: 1}
    assert sink.counts("/other") == {plain["messageId"]: 1, no_hook["messageId"]: 1, only_other["messageId"]: 1}
    assert nowhere["messageId"] in {e["message_id"] for e in pipeline.db.events()}


def test_the_webhook_write_key_override_decides_the_source_and_so_the_destinations(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> None:
    pipeline = start_pipeline(
        [webhook(sink.url + "/web-hook"), webhook(sink.url + "/app-hook", name="app-hook")],
        sources=[{"name": "web", "write_keys": ["WEBKEY"], "destinations": ["hook"]},
                 {"name": "app", "write_keys": ["APPKEY"], "destinations": ["app-hook"]}])
    overridden = track("u1", writeKey="WEBKEY")
    as_sent = track("u2", writeKey="WEBKEY")

    first = pipeline.receiver.post("/v1/webhook?writeKey=APPKEY", overridden)
    second = pipeline.receiver.post("/v1/webhook", as_sent)
    assert (first.status_code, second.status_code) == (200, 200)
    wait_for(lambda: pipeline.db.settled(2), "two deliveries to settle")

    assert sink.counts("/app-hook") == {overridden["messageId"]: 1}
    assert sink.counts("/web-hook") == {as_sent["messageId"]: 1}
    assert {e["message_id"]: e["source"] for e in pipeline.db.events()} == {
        overridden["messageId"]: "app", as_sent["messageId"]: "web"}
    assert all("writeKey" not in event for event in sink.events())


# --- trackrelay run, as real processes ------------------------------------------------------------


def test_trackrelay_run_receives_and_delivers_in_separate_processes_and_exits_0_on_sigterm(
        database_url: str, tmp_path: Path, sink: ScriptedSink) -> None:
    port = free_port()
    path = write_config(tmp_path / "trackrelay.toml", database_url, [webhook(sink.url + "/in")],
                        receiver={"port": port})
    processes = Processes(tmp_path)
    try:
        run = processes.start("run", "--config", str(path))
        run.wait_for_log(r"event=started role=worker")
        run.wait_for_log(r"event=started role=receiver")
        event = track("u1", writeKey=WRITE_KEY)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/track", json=event, timeout=10)
        assert (response.status_code, response.json()) == (200, {"Success": True})

        delivered = wait_for(lambda: sink.events("/in"), "the event at the sink")
        assert [e["messageId"] for e in delivered] == [event["messageId"]]
        assert "writeKey" not in delivered[0] and delivered[0]["context"] == {"ip": "127.0.0.1"}

        pids = {int(pid) for pid in re.findall(r"pid=(\d+) event=started role=(?:worker|receiver)", run.log)}
        assert len(pids) == 2 and run.popen.pid not in pids  # receiver and worker: two children
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.log
        assert "event=stopped role=worker" in run.log and "event=stopped role=receiver" in run.log
        # A clean log: no job cancelled on the way out, no line per delivered request.
        assert "Traceback" not in run.log and "HTTP Request:" not in run.log
    finally:
        processes.kill_leftovers()
