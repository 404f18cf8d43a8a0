"""pipeline.decoder.Decoder: outbox rows become deduplicated events and their deliveries, atomically."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy.exc import DBAPIError

from pipeline.config import Config, DestinationConfig, SourceConfig, WorkerConfig
from pipeline.decoder import DecodeResult, Decoder
from pipeline.normalise import StoredRequest
from pipeline.store import Store
from stored_rows import opened_store, outbox_row, rows

RECEIVED_MS = 1_795_000_000_000


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield from opened_store(database_url)


def destination(name: str, **settings: Any) -> DestinationConfig:
    return DestinationConfig(name=name, type="log", options=None, batch_size=1, **settings)


def decoder(store: Store, *, sources: tuple[SourceConfig, ...] = (), decode_batch_rows: int = 100,
            decode_batch_events: int = 2000,
            destinations: tuple[DestinationConfig, ...] = (destination("hook"), destination("warehouse"))) -> Decoder:
    config = Config(sources=sources, destinations=destinations,
                    worker=WorkerConfig(decode_batch_rows=decode_batch_rows, decode_batch_events=decode_batch_events))
    return Decoder(store, config)


def track(message_id: str | None = None, name: str = "Signed Up", **fields: Any) -> dict[str, Any]:
    message = {"type": "track", "event": name, "userId": "u1", **fields}
    if message_id is not None:
        message["messageId"] = message_id
    return message


def delivered_to(store: Store) -> list[tuple[str, str]]:
    """(messageId, destination) of every delivery, in id order."""
    message_ids = {e["id"]: e["message_id"] for e in rows(store, "events")}
    return [(message_ids[d["event_id"]], d["destination"]) for d in rows(store, "deliveries")]


def test_a_group_whose_events_all_lack_a_name_decodes(store: Store) -> None:
    """Event names go to Postgres as one binary text[] per group: all NULL (no track event in
    the group) is a case of its own for psycopg's array dumper."""
    store.append([outbox_row({"batch": [{"type": "identify", "userId": "u1", "messageId": "i1"},
                                        {"type": "page", "userId": "u1", "messageId": "p1"}]})])

    assert decoder(store).decode_pending().events == 2
    assert [(e["message_id"], e["type"], e["event_name"]) for e in rows(store, "events")] == [
        ("i1", "identify", None), ("p1", "page", None)]


def states(store: Store) -> list[str]:
    return [r["state"] for r in rows(store, "outbox")]


def test_decode_turns_rows_into_events_deliveries_and_rejected_items(store: Store) -> None:
    store.append([
        outbox_row({"batch": [track("m1"), track("m2", integrations={"warehouse": False}),
                              {"type": "track", "userId": "u1"}]}, received_at_ms=RECEIVED_MS),
        outbox_row({"userId": "u2", "traits": {"plan": "pro"}, "messageId": "m3"}, "identify",
                   received_at_ms=RECEIVED_MS + 1, remote_addr="198.51.100.9"),
    ])

    result = decoder(store).decode_pending()

    assert result == DecodeResult(rows=2, events=3, duplicates=0, deliveries=5, refused=1)
    outbox_ids = [r["id"] for r in rows(store, "outbox")]
    assert [(e["source"], e["message_id"], e["type"], e["event_name"], e["outbox_id"], e["received_at_ms"])
            for e in rows(store, "events")] == [
        ("default", "m1", "track", "Signed Up", outbox_ids[0], RECEIVED_MS),
        ("default", "m2", "track", "Signed Up", outbox_ids[0], RECEIVED_MS),
        ("default", "m3", "identify", None, outbox_ids[1], RECEIVED_MS + 1)]
    assert orjson.loads(rows(store, "events")[2]["payload"]) == {
        "type": "identify", "userId": "u2", "traits": {"plan": "pro"}, "messageId": "m3",
        "context": {"ip": "198.51.100.9"}, "integrations": {}, "receivedAt": "2026-11-18T11:06:40.001Z",
        "timestamp": "2026-11-18T11:06:40.001Z"}
    assert delivered_to(store) == [("m1", "hook"), ("m1", "warehouse"), ("m2", "hook"),
                                   ("m3", "hook"), ("m3", "warehouse")]
    deliveries = rows(store, "deliveries")
    assert {(d["state"], d["attempts"], d["locked_until_ms"], d["locked_by"], d["finished_at_ms"],
             d["next_attempt_at_ms"] == d["created_at_ms"]) for d in deliveries} == {
        ("pending", 0, None, None, None, True)}
    (refused,) = rows(store, "rejected")
    assert {k: refused[k] for k in ("received_at_ms", "route", "source", "status", "code", "reason",
                                    "remote_addr")} == {
        "received_at_ms": RECEIVED_MS, "route": "batch", "source": None, "status": 400, "code": "missing_event",
        "reason": "batch item 2: Missing event: track needs an event name", "remote_addr": "203.0.113.7"}
    assert orjson.loads(refused["raw"]) == {"type": "track", "userId": "u1"}
    assert states(store) == ["done", "done"]


def test_a_second_decode_finds_nothing_to_do(store: Store) -> None:
    store.append([outbox_row(track("m1"), "track")])
    decode = decoder(store)

    assert decode.decode_pending() == DecodeResult(1, 1, 0, 2, 0)
    assert decode.decode_pending() == DecodeResult(0, 0, 0, 0, 0)
    assert len(rows(store, "deliveries")) == 2


def test_a_request_refused_whole_is_recorded_without_an_index(store: Store) -> None:
    store.append([outbox_row(b'{"batch": []}', received_at_ms=RECEIVED_MS)])

    assert decoder(store).decode_pending() == DecodeResult(1, 0, 0, 0, 1)
    assert [(r["code"], r["reason"], r["raw"]) for r in rows(store, "rejected")] == [
        ("empty_batch", "Empty batch: batch holds no messages", b'{"batch": []}')]
    assert states(store) == ["done"]


def test_sources_resolve_per_message_and_route_to_their_own_destinations(store: Store) -> None:
    sources = (SourceConfig("web", ("wk_web",)), SourceConfig("app", ("wk_app",), ("warehouse",)))
    store.append([outbox_row({"batch": [track("w1"), track("a1", writeKey="wk_app"), track("x1", writeKey="nope")],
                              "writeKey": "wk_web"}, source="web")])

    result = decoder(store, sources=sources).decode_pending()

    assert result == DecodeResult(1, 2, 0, 3, 1)
    assert [(e["source"], e["message_id"]) for e in rows(store, "events")] == [("web", "w1"), ("app", "a1")]
    assert delivered_to(store) == [("w1", "hook"), ("w1", "warehouse"), ("a1", "warehouse")]
    assert [(r["code"], r["reason"]) for r in rows(store, "rejected")] == [
        ("invalid_write_key", "batch item 2: Invalid or missing writekey")]


def test_decoding_is_one_transaction_that_commits_whole_or_not_at_all(store: Store) -> None:
    store.append([outbox_row({"batch": [track("m1"), track("m2"), {"type": "track", "userId": "u1"}]}),
                  outbox_row(track("m3"), "track")])
    # A real failure at the last step (marking the rows done), after the events, deliveries and
    # rejected rows were inserted in the same transaction.
    refuse_outbox_updates(store)

    with pytest.raises(DBAPIError, match="refused by test trigger"):
        decoder(store).decode_pending()

    assert (rows(store, "events"), rows(store, "deliveries"), rows(store, "rejected")) == ([], [], [])
    assert states(store) == ["pending", "pending"]

    allow_outbox_updates(store)
    assert decoder(store).decode_pending() == DecodeResult(2, 3, 0, 6, 1)
    assert [e["message_id"] for e in rows(store, "events")] == ["m1", "m2", "m3"]
    assert states(store) == ["done", "done"]


def refuse_outbox_updates(store: Store) -> None:
    with store.engine.begin() as conn:
        if store.backend == "sqlite":
            conn.exec_driver_sql("CREATE TRIGGER refuse_done BEFORE UPDATE ON outbox "
                                 "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END")
        else:
            conn.exec_driver_sql("CREATE FUNCTION refuse_done() RETURNS trigger LANGUAGE plpgsql AS "
                                 "$$ BEGIN RAISE EXCEPTION 'refused by test trigger'; END $$")
            conn.exec_driver_sql("CREATE TRIGGER refuse_done BEFORE UPDATE ON outbox "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse_done()")


def allow_outbox_updates(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_done" + ("" if store.backend == "sqlite" else " ON outbox"))


def test_a_message_resent_in_a_later_request_creates_no_new_event_or_delivery(store: Store) -> None:
    decode = decoder(store)
    store.append([outbox_row({"batch": [track("m1"), track("m2")]})])
    decode.decode_pending()
    store.append([outbox_row({"batch": [track("m1"), track("m2"), track("m3")]})])

    assert decode.decode_pending() == DecodeResult(1, 1, 2, 2, 0)
    assert [e["message_id"] for e in rows(store, "events")] == ["m1", "m2", "m3"]
    assert delivered_to(store) == [("m1", "hook"), ("m1", "warehouse"), ("m2", "hook"), ("m2", "warehouse"),
                                   ("m3", "hook"), ("m3", "warehouse")]
    assert states(store) == ["done", "done"]


def test_a_message_resent_in_the_same_decode_round_is_one_event(store: Store) -> None:
    store.append([outbox_row(track("m1"), "track"), outbox_row(track("m1"), "track")])

    assert decoder(store).decode_pending() == DecodeResult(2, 1, 1, 2, 0)
    assert delivered_to(store) == [("m1", "hook"), ("m1", "warehouse")]


def test_a_message_twice_in_one_batch_is_one_event(store: Store) -> None:
    store.append([outbox_row({"batch": [track("m1", name="First"), track("m1", name="Second")]})])

    assert decoder(store).decode_pending() == DecodeResult(1, 1, 1, 2, 0)
    assert [(e["message_id"], e["event_name"]) for e in rows(store, "events")] == [("m1", "First")]
    assert delivered_to(store) == [("m1", "hook"), ("m1", "warehouse")]


def test_the_same_message_id_from_two_sources_is_two_events(store: Store) -> None:
    sources = (SourceConfig("web", ("wk_web",)), SourceConfig("app", ("wk_app",)))
    store.append([outbox_row({"batch": [track("m1", writeKey="wk_web"), track("m1", writeKey="wk_app")]})])

    assert decoder(store, sources=sources).decode_pending() == DecodeResult(1, 2, 0, 4, 0)
    assert [(e["source"], e["message_id"]) for e in rows(store, "events")] == [("web", "m1"), ("app", "m1")]


def test_generated_message_ids_make_decoding_the_same_row_twice_harmless(store: Store) -> None:
    store.append([outbox_row({"batch": [track(), track()]})])
    decode = decoder(store)
    decode.decode_pending()
    (row,) = rows(store, "outbox")
    request = StoredRequest(row["id"], row["received_at_ms"], row["route"], row["body"], row["remote_addr"])

    # As if a crash had left the row pending after its events were stored.
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE outbox SET state = 'pending'")

    assert decode.decode_pending() == DecodeResult(1, 0, 2, 0, 0)
    assert [e["message_id"] for e in rows(store, "events")] == [e.message_id for e in decode.expand(request).events]
    assert len(rows(store, "deliveries")) == 4


def test_each_call_decodes_at_most_decode_batch_rows(store: Store) -> None:
    store.append([outbox_row(track(f"m{i}"), "track") for i in range(5)])
    decode = decoder(store, decode_batch_rows=2, destinations=(destination("hook"),))

    assert [decode.decode_pending().rows for _ in range(4)] == [2, 2, 1, 0]
    assert [e["message_id"] for e in rows(store, "events")] == ["m0", "m1", "m2", "m3", "m4"]


def test_a_group_stops_at_the_row_that_reaches_decode_batch_events(store: Store) -> None:
    store.append([outbox_row({"batch": [track(f"r{r}m{i}") for i in range(3)]}) for r in range(5)])
    decode = decoder(store, decode_batch_events=5, destinations=(destination("hook"),))

    results = [decode.decode_pending() for _ in range(4)]

    assert [(r.rows, r.events, r.more) for r in results] == [(2, 6, True), (2, 6, True), (1, 3, False), (0, 0, False)]
    assert states(store) == ["done"] * 5
    assert len(rows(store, "events")) == len(rows(store, "deliveries")) == 15


def test_a_group_that_reaches_its_row_limit_says_more_may_remain(store: Store) -> None:
    store.append([outbox_row(track(f"m{i}"), "track") for i in range(2)])
    decode = decoder(store, decode_batch_rows=2, destinations=(destination("hook"),))

    assert [(r.rows, r.more) for r in (decode.decode_pending(), decode.decode_pending())] == [(2, True), (0, False)]


def test_replay_delivers_to_one_destination_again_duplicates_included(store: Store) -> None:
    store.append([outbox_row({"batch": [track("m1"), track("m2"), {"type": "track", "userId": "u"}]})])
    decode = decoder(store)
    decode.decode_pending()
    requests = [StoredRequest(r["id"], r["received_at_ms"], r["route"], r["body"], r["remote_addr"])
                for r in rows(store, "outbox")]

    result = decode.replay_requests(requests, "warehouse")

    assert result == DecodeResult(1, 2, 0, 2, 0)
    assert len(rows(store, "events")) == 2
    assert delivered_to(store) == [("m1", "hook"), ("m1", "warehouse"), ("m2", "hook"), ("m2", "warehouse"),
                                   ("m1", "warehouse"), ("m2", "warehouse")]
    assert len(rows(store, "rejected")) == 1


def test_replay_of_a_request_never_decoded_stores_its_events_for_that_destination_only(store: Store) -> None:
    store.append([outbox_row(track("m9"), "track", state="done")])
    (row,) = rows(store, "outbox")
    request = StoredRequest(row["id"], row["received_at_ms"], row["route"], row["body"], row["remote_addr"])

    assert decoder(store).replay_requests([request], "hook") == DecodeResult(1, 1, 0, 1, 0)
    assert delivered_to(store) == [("m9", "hook")]


def test_nul_characters_neither_block_decoding_nor_reach_text_columns(store: Store) -> None:
    store.append([outbox_row({"batch": [track("m\u0000x"), track("m2", name="Sign\u0000ed Up")]})])

    assert decoder(store).decode_pending() == DecodeResult(1, 1, 0, 2, 1)
    (event,) = rows(store, "events")
    assert (event["message_id"], event["event_name"]) == ("m2", "Signed Up")
    assert orjson.loads(event["payload"])["event"] == "Sign\u0000ed Up"
    assert [(r["code"], r["reason"]) for r in rows(store, "rejected")] == [
        ("invalid_message_id", "batch item 0: Invalid messageId: messageId must be a string of at most 100 "
                               "characters, without NUL")]
    assert states(store) == ["done"]


def refuse_event(store: Store, message_id: str) -> None:
    """A real refusal by the database of one event (as Postgres refuses a value it cannot hold)."""
    with store.engine.begin() as conn:
        if store.backend == "sqlite":
            conn.exec_driver_sql(f"CREATE TRIGGER refuse_event BEFORE INSERT ON events WHEN NEW.message_id = "
                                 f"'{message_id}' BEGIN SELECT RAISE(ABORT, 'poison event'); END")
        else:
            conn.exec_driver_sql("CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS "
                                 f"$$ BEGIN IF NEW.message_id = '{message_id}' THEN "
                                 "RAISE EXCEPTION 'poison event'; END IF; RETURN NEW; END $$")
            conn.exec_driver_sql("CREATE TRIGGER refuse_event BEFORE INSERT ON events "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse_event()")


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_decode(store: Store) -> None:
    store.append([outbox_row({"batch": [track("m1"), track("m2")]}),
                  outbox_row(track("poison"), "track"),
                  outbox_row(track("m3"), "track")])
    refuse_event(store, "poison")

    result = decoder(store).decode_pending()

    assert (result.rows, result.events, result.deliveries, result.refused) == (3, 3, 6, 1)
    assert [e["message_id"] for e in rows(store, "events")] == ["m1", "m2", "m3"]
    assert states(store) == ["done", "failed", "done"]
    [record] = rows(store, "rejected")
    assert (record["code"], record["status"]) == ("decode_failed", 500)
    assert "poison event" in record["reason"] and record["raw"] == orjson.dumps(track("poison"))
    # The next call finds nothing left to decode: the failed row is not retried forever.
    assert decoder(store).decode_pending().rows == 0


def nested(depth: int) -> bytes:
    """A JSON object ``depth`` levels deep: orjson reads up to 1024 levels, writes up to 255."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def test_a_message_nested_too_deep_to_store_is_refused_and_the_rest_decode(store: Store) -> None:
    deep = b'{"type":"track","event":"x","userId":"u","messageId":"deep","properties":' + nested(300) + b"}"
    batch = b'{"batch":[' + deep + b"," + orjson.dumps(track("m1")) + b"]}"
    # Stored as a receiver older than this check would have stored them (it answered 200).
    store.append([outbox_row(deep, "track"), outbox_row(batch), outbox_row(track("m2"), "track")])

    result = decoder(store).decode_pending()

    assert (result.rows, result.events, result.refused) == (3, 2, 2)
    assert [e["message_id"] for e in rows(store, "events")] == ["m1", "m2"]
    assert states(store) == ["done", "done", "done"]
    assert [(r["code"], r["status"], r["raw"]) for r in rows(store, "rejected")] == [
        ("nesting_too_deep", 400, None), ("nesting_too_deep", 400, None)]


def test_a_batch_context_nested_too_deep_refuses_each_message_it_would_be_merged_into(store: Store) -> None:
    body = b'{"context":' + nested(260) + b',"batch":[' + orjson.dumps(track("m1")) + b"]}"
    store.append([outbox_row(body), outbox_row(track("m2"), "track")])

    assert decoder(store).decode_pending().events == 1
    assert [e["message_id"] for e in rows(store, "events")] == ["m2"]
    assert [(r["code"], r["reason"]) for r in rows(store, "rejected")] == [
        ("nesting_too_deep", "batch item 0: Message nested too deeply: JSON nested more than 255 levels "
                             "deep cannot be stored")]


def test_a_row_that_trips_a_bug_of_ours_is_set_aside_and_the_rest_decode(
        store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Not a database refusal: any exception while decoding one row (injected here, since a
    real one would be a bug we fix) must not stop the rows behind it."""
    store.append([outbox_row(track("m1"), "track"), outbox_row(track("trips"), "track"),
                  outbox_row(track("m3"), "track")])
    subject = decoder(store)
    expand = Decoder.expand

    def tripping_expand(self: Decoder, request: StoredRequest) -> Any:
        if b'"trips"' in request.body:
            raise KeyError("injected fault")
        return expand(self, request)

    monkeypatch.setattr(Decoder, "expand", tripping_expand)

    with caplog.at_level("WARNING", logger="trackrelay"):
        result = subject.decode_pending()

    assert (result.rows, result.events, result.refused) == (3, 2, 1)
    assert [e["message_id"] for e in rows(store, "events")] == ["m1", "m3"]
    assert states(store) == ["done", "failed", "done"]
    [record] = rows(store, "rejected")
    assert record["code"] == "decode_failed" and "injected fault" in record["reason"]
    # The group failed once, then row by row only the row that trips is set aside, by its id.
    trips_id = next(r["id"] for r in rows(store, "outbox") if r["state"] == "failed")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("trackrelay")] == [
        "event=decode_group_failed rows<=100 error=\"KeyError: 'injected fault'\" action=row_by_row",
        f"event=decode_row_failed outbox_id={trips_id} error=\"KeyError: 'injected fault'\""]
