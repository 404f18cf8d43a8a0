"""Numbers keep the digits they were sent with: pipeline/exactjson.py on its own, and through a
real receiver and worker to a real webhook sink (whose raw bytes are read, not re-parsed into
floats); an id no int or float can hold is refused with a 400 that names it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest

from conftest import RunningReceiver, unique_id
from pipeline import exactjson
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook

# Each as text: what it must still be, digit for digit, where it arrives.
EXACT = ["1234567890123456789012345", "-9223372036854775809", "18446744073709551616",
         "1.00000000000000000001", "0.30000000000000000004", "123456789012345678.5", "1.2345678901234567890e+30"]
# What orjson keeps anyway: these stay ints and floats.
NATIVE = {"18446744073709551615": 18446744073709551615, "-9223372036854775808": -9223372036854775808,
          "0.1": 0.1, "12345678901234567": 12345678901234567, "1.5": 1.5, "3.141592653589793": 3.141592653589793}


@pytest.mark.parametrize("text", EXACT)
def test_a_number_no_double_holds_is_kept_as_its_text(text: str) -> None:
    value = exactjson.loads(f'{{"n": {text}}}'.encode())["n"]
    assert exactjson.is_exact_number(value)
    assert orjson.dumps({"n": value}) == f'{{"n":{text}}}'.encode()


@pytest.mark.parametrize(("text", "value"), NATIVE.items())
def test_numbers_orjson_keeps_stay_native(text: str, value: Any) -> None:
    parsed = exactjson.loads(f'[{text}, "{"9" * 20}"]'.encode())  # a long run elsewhere: the slow path
    assert parsed[0] == value and type(parsed[0]) is type(value)


def test_without_a_long_run_of_digits_orjson_alone_parses() -> None:
    assert not exactjson.may_lose_digits(b'{"a": 123456789012345, "b": "2026-12-01T10:00:00.123Z"}')
    assert not exactjson.may_lose_digits(b'{"a": 1234567.1234567, "b": 1.5e-10}')  # 14 digits: exact
    assert exactjson.may_lose_digits(b'{"a": "x1234567890123456"}')


@pytest.mark.parametrize("text", ["82.15390486277237", "1.2345678901234567e5", "-0.12345678901234567",
                                  "123456789.12345678"])
def test_sixteen_digits_split_by_the_point_are_a_long_run_too(text: str) -> None:
    """Found by tests/test_stored_json.py's property: 16 significant digits in runs of 2 and 14
    went to orjson alone, and came back one unit in the last place off."""
    body = f'{{"n": {text}}}'.encode()  # nothing else in the body takes the slow path
    assert exactjson.may_lose_digits(body)
    value = exactjson.loads(body)["n"]
    assert Decimal(orjson.dumps(value).decode()) == Decimal(text)


def test_invalid_json_is_refused_as_orjson_refuses_it() -> None:
    for body in (b'{"a": 12345678901234567890, }', b'{"a": NaN, "b": 12345678901234567890}',
                 b'{"a": "\\ud800", "b": 12345678901234567890}'):
        with pytest.raises(orjson.JSONDecodeError):
            exactjson.loads(body)


def test_deep_nesting_with_a_long_number_does_not_crash() -> None:
    body = b"[" * 1000 + b"12345678901234567890123" + b"]" * 1000
    value = exactjson.loads(body)  # too deep for the standard library: orjson's reading stands
    for _ in range(1000):
        value = value[0]
    assert value == float("12345678901234567890123")  # refused anyway: nested past 255 levels


def track_with(number_texts: list[str]) -> bytes:
    properties = ", ".join(f'"p{i}": {text}' for i, text in enumerate(number_texts))
    return (f'{{"type": "track", "userId": "u1", "event": "Measured", "messageId": "{unique_id()}", '
            f'"properties": {{{properties}, "nested": {{"list": [{number_texts[0]}, 1]}}}}}}').encode()


def raw_number(body: bytes, key: str) -> str:
    """The text of ``key``'s number in a JSON body, read off the bytes."""
    match = re.search(rb'"' + key.encode() + rb'":\s*(-?[0-9][0-9.eE+-]*)', body)
    assert match, (key, body[:500])
    return match.group(1).decode()


@pytest.mark.parametrize("route", ["/v1/track", "/v1/batch"])
def test_numbers_arrive_at_a_webhook_with_every_digit(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink,
                                                     route: str) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/in")])
    body = track_with(EXACT)
    if route == "/v1/batch":
        body = b'{"batch": [' + body + b"]}"
    response = pipeline.receiver.post(route, body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    wait_for(lambda: sink.answered, "the event at the sink")
    recorded = sink.answered[0][0]
    for i, text in enumerate(EXACT):
        assert raw_number(recorded.body, f"p{i}") == text
    assert f'"nested":{{"list":[{EXACT[0]},1]}}'.encode() in recorded.body
    # Read as a decimal-preserving JSON reader would, every value is the one sent.
    delivered = json.loads(recorded.body, parse_float=Decimal)["properties"]
    assert [Decimal(str(delivered[f"p{i}"])) for i in range(len(EXACT))] == [Decimal(t) for t in EXACT]


@pytest.mark.parametrize("key", ["userId", "anonymousId", "previousId", "groupId"])
def test_an_id_no_number_type_holds_is_refused_naming_it(receiver: RunningReceiver, key: str) -> None:
    kind = {"previousId": "alias", "groupId": "group"}.get(key, "identify")
    body = f'{{"type": "{kind}", "userId": "u1", "{key}": 1234567890123456789012345}}'.encode()
    response = receiver.post(f"/v1/{kind}", body)
    assert response.status_code == 400
    assert key in response.json()["Details"] and "too large to keep exactly" in response.json()["Details"]
    assert receiver.outbox() == []


def test_a_big_but_exact_integer_id_is_kept(receiver: RunningReceiver) -> None:
    response = receiver.post("/v1/identify", b'{"userId": 18446744073709551615}')
    assert response.status_code == 200
