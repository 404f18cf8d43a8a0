"""Adapters that only write events out as JSON are handed the JSON the worker stored, unparsed
(``Destination.takes_stored_json``). What they send must be what parsing and serialising it
again would have sent, byte for byte: checked as a property of the stored JSON, and through a
real receiver and worker to a real webhook sink and a real file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import unique_id
from pipeline import exactjson
from pipeline.destinations.database import DatabaseDestination, DatabaseOptions
from pipeline.destinations.file import FileDestination, FileOptions
from pipeline.destinations.log import LogDestination, LogOptions
from pipeline.destinations.null import NullDestination
from pipeline.destinations.segment import SegmentDestination, SegmentOptions
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook

# Numbers as text, of every kind exactjson keeps as a Fragment or orjson keeps as it is.
NUMBER_TEXTS = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).map(lambda d: f"{d:f}" if "E" not in str(d)
                                                                          else str(d).replace("E", "e")),
    st.sampled_from(["1e400", "-1e400", "1e-400", "4e-324", "1.2345678901234567890e+30", "0.1", "-0", "1E5"]),
)
KEYS = st.text(min_size=0, max_size=8)
STRINGS = st.text(max_size=12)  # any code point: escapes, emoji, control characters


def json_text(depth: int = 3) -> st.SearchStrategy[str]:
    """JSON as a client would send it (a number keeps the text it was written with)."""
    scalars = st.one_of(NUMBER_TEXTS, STRINGS.map(json.dumps), st.sampled_from(["true", "false", "null"]))
    if depth == 0:
        return scalars
    inner = json_text(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(KEYS, inner, max_size=4).map(
            lambda d: "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in d.items()) + "}"),
    )


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, json_text(), min_size=1, max_size=5))
def test_stored_json_parsed_and_written_again_is_the_same_bytes(properties: dict[str, str]) -> None:
    body = ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in properties.items()) + "}").encode()
    try:
        received = exactjson.loads(body)  # what the receiver's decoder reads
    except ValueError:
        return  # refused at the door (a number past what JSON may hold): never stored
    stored = orjson.dumps({"type": "track", "properties": received})  # what the decoder stores
    assert orjson.dumps(exactjson.loads(stored)) == stored  # the old path: parse, serialise
    assert orjson.dumps(exactjson.Fragment(stored)) == stored  # the new path: as it is
    assert orjson.dumps({"batch": [exactjson.Fragment(stored)] * 2}) == \
        orjson.dumps({"batch": [exactjson.loads(stored)] * 2})


def test_which_adapters_take_the_stored_json(tmp_path: Path) -> None:
    hook = WebhookDestination("hook", WebhookOptions(url="http://127.0.0.1:9/in"), 1)
    segment = SegmentDestination("seg", SegmentOptions(write_key="k", url="http://127.0.0.1:9"), 100)
    assert hook.takes_stored_json and not segment.takes_stored_json  # segment adds sentAt to each
    assert FileDestination("file", FileOptions(path=str(tmp_path)), 10).takes_stored_json
    assert NullDestination("null", None, 10).takes_stored_json
    assert not LogDestination("log", LogOptions(), 10).takes_stored_json  # reads type and messageId
    warehouse = DatabaseDestination("db", DatabaseOptions(url=f"sqlite:///{tmp_path / 'w.sqlite'}"), 10)
    assert not warehouse.takes_stored_json  # reads every field

    class Stamped(WebhookDestination):  # a subclass with its own request reads the events
        async def encode(self, chunk: Any) -> tuple[bytes, dict[str, str]]:
            return orjson.dumps([{**event, "stamped": True} for event in chunk]), {}

    assert not Stamped("stamped", WebhookOptions(url="http://127.0.0.1:9/in"), 1).takes_stored_json

    class Counted(WebhookDestination):  # reads each event's fields when the answer comes
        def outcomes(self, chunk: Any, response: Any) -> list[Any]:
            assert all(event["messageId"] for event in chunk)
            return super().outcomes(chunk, response)

    class Filtered(FileDestination):
        async def deliver(self, events: Any) -> list[Any]:
            return await super().deliver([e for e in events if e.get("type") != "page"])

    class Routed(WebhookDestination):  # only the URL changes: the events still pass as they are
        def endpoint(self) -> str:
            return self.options.url + "/routed"

    assert not Counted("counted", WebhookOptions(url="http://127.0.0.1:9/in"), 1).takes_stored_json
    assert not Filtered("filtered", FileOptions(path=str(tmp_path)), 10).takes_stored_json
    assert Routed("routed", WebhookOptions(url="http://127.0.0.1:9/in"), 1).takes_stored_json


LONG_NUMBERS = ["1234567890123456789012345", "1.00000000000000000001", "1e400", "-0.0", "1E5"]


def event_body(message_id: str) -> bytes:
    properties = ", ".join(f'"p{i}": {text}' for i, text in enumerate(LONG_NUMBERS))
    return (f'{{"type": "track", "userId": "u\\u00e9", "event": "Measured \\ud83d\\ude00", '
            f'"messageId": "{message_id}", "properties": {{{properties}, "s": "a\\"b\\n\\u0001"}}}}').encode()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_webhook_and_the_file_get_the_stored_json_byte_for_byte(
        start_pipeline: Callable[..., Pipeline], sink: ScriptedSink, tmp_path: Path, batch_size: int) -> None:
    files = tmp_path / "files"
    pipeline = start_pipeline([webhook(sink.url + "/in", batch_size=batch_size),
                               {"name": "file", "type": "file", "path": str(files), "batch_size": batch_size}])
    ids = [unique_id() for _ in range(3)]
    body = b'{"batch": [' + b", ".join(event_body(i) for i in ids) + b"]}"
    response = pipeline.receiver.post("/v1/batch", body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    wait_for(lambda: pipeline.db.settled(6), "six deliveries settled")
    assert pipeline.db.states() == {"delivered": 6}
    stored = {row["message_id"]: row["payload"] for row in pipeline.db.events()}
    assert sorted(stored) == sorted(ids)
    # What the old path (parse, then orjson.dumps) would have sent, built here from the rows.
    expected = [orjson.dumps(exactjson.loads(stored[i])) for i in ids]
    assert expected == [stored[i] for i in ids]
    bodies = [recorded.body for recorded, _, _ in sink.answered]
    if batch_size == 1:
        assert sorted(bodies) == sorted(expected)
    else:
        assert bodies == [b'{"batch":[' + b",".join(expected) + b"]}"]
    lines = b"".join(path.read_bytes() for path in sorted(files.iterdir())).splitlines()
    assert sorted(lines) == sorted(expected)
    # And the digits are the ones sent.
    delivered = exactjson.loads(expected[0])["properties"]
    assert [orjson.dumps(delivered[f"p{i}"]).decode() for i in range(len(LONG_NUMBERS))] == \
        ["1234567890123456789012345", "1.00000000000000000001", "1e400", "-0.0", "100000.0"]
