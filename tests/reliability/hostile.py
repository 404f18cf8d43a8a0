"""Hostile request bodies and the checks on what comes out, shared by the hostile-body tests,
the fuzzer and the key-leak tests.

A body is built as bytes, never through a JSON library, so that it can say what no library
writes: numbers of any length, NaN, lone surrogates, invalid UTF-8, duplicate keys. What a
destination received is read back with :func:`strict_json`, which refuses anything that is
not valid JSON in valid UTF-8 and keeps every number as a ``Decimal`` of its text, so a
number's value can be compared with what was sent digit for digit.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from receiver.ingest import ingest_routes
from pipeline.messages import MESSAGE_TYPES

GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
INGEST_PATHS = sorted(ingest_routes())  # every POST path that takes events, aliases included
SINGLE_PATHS = [p for p, r in sorted(ingest_routes().items()) if r.kind == "single"]
BATCH_PATHS = [p for p, r in sorted(ingest_routes().items()) if r.kind == "batch"]
WEBHOOK_PATHS = [p for p, r in sorted(ingest_routes().items()) if r.kind == "webhook"]
PIXEL_PATHS = [f"/v1/pixel/{kind}" for kind in MESSAGE_TYPES]

# Numbers as text, each to arrive with its value exactly (compared as Decimals).
EXACT_NUMBERS = ["1234567890123456789012345", "-9223372036854775809", "9" * 400, "-" + "7" * 1000,
                 "0.30000000000000000004", "3.14159265358979323846264338327950288419716939937510",
                 "1e400", "-1E+400", "1e-400", "-1e-400", "4e-324", "2.5e-320", "-0", "-0.0", "0e0",
                 "1.5e-10", "18446744073709551615", "12345678901234567", "1.0", "100"]


def route_type(path: str) -> str | None:
    """The message type a path implies (None for batch and webhook routes)."""
    route = ingest_routes().get(path)
    return route.route_type if route is not None else path.rsplit("/", 1)[-1]


def message(path_or_type: str | None, message_id: str, extra: bytes = b"", user_id: bytes = b'"u1"') -> bytes:
    """A valid message for a route (or a type) as bytes, with ``extra`` members spliced in."""
    kind = (route_type(path_or_type) if path_or_type and path_or_type.startswith("/") else path_or_type) or "track"
    fields = {"track": b'"event":"Hostile"', "group": b'"groupId":"g1"', "alias": b'"previousId":"p1"'}.get(kind, b"")
    members = [b'"type":"' + kind.encode() + b'"', b'"userId":' + user_id, b'"messageId":"' + message_id.encode() + b'"']
    members += [m for m in (fields, extra) if m]
    return b"{" + b",".join(members) + b"}"


def for_route(path: str, body: bytes) -> bytes:
    """``body`` (one message) as the route takes it: batch routes get ``{"batch": [body]}``."""
    return b'{"batch":[' + body + b"]}" if path in BATCH_PATHS else body


def properties(*members: bytes) -> bytes:
    return b'"properties":{' + b",".join(members) + b"}"


@dataclass(frozen=True)
class Hostile:
    """A hostile message. ``accepted``: whether it is valid (it must then be delivered with
    ``expect``'s members, as :func:`strict_json` reads them); otherwise it must be refused 4xx."""

    name: str
    body: bytes
    accepted: bool
    expect: dict[str, Any] | None = None


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b'{"a":' * depth + leaf + b"}" * depth


def hostile_messages(kind: str | None, new_id: Callable[[], str]) -> Iterator[Hostile]:
    """Every hostile variant of one message for a route type; each gets its own messageId."""
    def valid(name: str, extra: bytes, expect: dict[str, Any], user_id: bytes = b'"u1"') -> Hostile:
        mid = new_id()
        return Hostile(name, message(kind, mid, extra, user_id), True, {"messageId": mid, **expect})

    def refused(name: str, body: bytes) -> Hostile:
        return Hostile(name, body, False)

    numbers = [b'"n%d":%s' % (i, text.encode()) for i, text in enumerate(EXACT_NUMBERS)]
    yield valid("exact numbers", properties(*numbers),
                {"properties": {f"n{i}": Decimal(t) for i, t in enumerate(EXACT_NUMBERS)}})
    yield valid("exact numbers in a list", properties(b'"l":[' + b",".join(t.encode() for t in EXACT_NUMBERS) + b"]"),
                {"properties": {"l": [Decimal(t) for t in EXACT_NUMBERS]}})
    yield valid("a numeric id of 64 bits", b"", {"userId": Decimal("18446744073709551615")},
                user_id=b"18446744073709551615")
    yield valid("escaped NUL, CR and LF", properties(b'"k\\u0000":"a\\u0000b\\r\\nSet-Cookie: x=1"'),
                {"properties": {"k\x00": "a\x00b\r\nSet-Cookie: x=1"}})
    yield valid("a surrogate pair", properties(b'"e":"\\ud83d\\ude00 \xf0\x9f\x98\x80"'),
                {"properties": {"e": "\U0001F600 \U0001F600"}})
    yield valid("duplicate keys, the last wins", properties(b'"d":1', b'"d":2'), {"properties": {"d": Decimal(2)}})
    yield valid("nested 250 deep", properties(b'"deep":' + nested(249)), {})
    mid = new_id()
    yield refused("a numeric id past 64 bits", message(kind, mid, user_id=b"1234567890123456789012345"))
    yield refused("a numeric id of 1e400", message(kind, new_id(), user_id=b"1e400"))
    yield refused("nested 300 deep", message(kind, new_id(), properties(b'"deep":' + nested(300))))
    yield refused("nested 10k deep", message(kind, new_id(), properties(b'"deep":' + nested(10_000))))
    yield refused("arrays 10k deep", b"[" * 10_000 + b"]" * 10_000)
    # 200 KB: a single route's 413, parsed (and refused) by the batch and webhook routes.
    yield refused("arrays 100k deep", message(kind, new_id(), properties(b'"deep":' + b"[" * 100_000 + b"]" * 100_000)))
    yield refused("NaN", message(kind, new_id(), properties(b'"x":NaN')))
    yield refused("Infinity", message(kind, new_id(), properties(b'"x":-Infinity')))
    yield refused("NaN beside a huge number", message(kind, new_id(), properties(b'"x":1e400', b'"y":NaN')))
    yield refused("invalid UTF-8", message(kind, new_id(), properties(b'"x":"\xff\xfe"')))
    yield refused("an overlong encoding", message(kind, new_id(), properties(b'"x":"\xc0\xaf"')))
    yield refused("an encoded surrogate", message(kind, new_id(), properties(b'"x":"\xed\xa0\x80"')))
    yield refused("a lone surrogate escape", message(kind, new_id(), properties(b'"x":"\\ud800"')))
    yield refused("a lone low surrogate beside a huge number",
                  message(kind, new_id(), properties(b'"x":1e400', b'"y":"\\udc00"')))
    yield refused("a raw NUL byte", message(kind, new_id(), properties(b'"x":"a\x00b"')))
    yield refused("a raw NUL outside strings", message(kind, new_id()) + b"\x00")
    yield refused("a raw CR LF in a string", message(kind, new_id(), properties(b'"x":"a\r\nb"')))
    yield refused("a UTF-8 BOM", b"\xef\xbb\xbf" + message(kind, new_id()))
    yield refused("UTF-16", message(kind, new_id()).decode().encode("utf-16"))
    yield refused("trailing garbage", message(kind, new_id()) + b"}")
    yield refused("not an object", b'"just a string"')
    yield refused("empty", b"")


def hostile_bodies_for(path: str, new_id: Callable[[], str]) -> Iterator[Hostile]:
    """:func:`hostile_messages` as ``path`` takes them."""
    for hostile in hostile_messages(route_type(path), new_id):
        wrapped = hostile.body if not hostile.accepted and hostile.name in ("arrays 10k deep", "not an object",
                                                                             "empty", "UTF-16", "a UTF-8 BOM") \
            else for_route(path, hostile.body)
        yield Hostile(hostile.name, wrapped, hostile.accepted, hostile.expect)


# --- encodings ----------------------------------------------------------------------------------

def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def deflate_bytes(data: bytes, raw: bool = False) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15 if raw else 15)
    return compressor.compress(data) + compressor.flush()


# name -> (Content-Encoding, encoder); raw deflate is sent as "deflate", as some clients do.
ENCODINGS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "identity": ("identity", lambda b: b), "gzip": ("gzip", gzip_bytes), "deflate": ("deflate", deflate_bytes),
    "raw deflate": ("deflate", lambda b: deflate_bytes(b, raw=True))}


def bomb(encoding: str, inflated: int = 200 * 1024 * 1024) -> bytes:
    """``inflated`` zero bytes, compressed (about 1,000x smaller)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    chunk = b"0" * (1024 * 1024)
    return b"".join(compressor.compress(chunk) for _ in range(inflated // len(chunk))) + compressor.flush()


# --- reading back ---------------------------------------------------------------------------------

def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """``data`` as JSON, or ValueError: strict UTF-8, no NaN/Infinity, no lone surrogates;
    every number a Decimal of its text (no digit lost in the reading)."""
    text = data.decode("utf-8")  # strict: invalid bytes and encoded surrogates raise
    value = json.loads(text, parse_int=Decimal, parse_float=Decimal, parse_constant=_no_constant)
    for string in strings_in(value):
        string.encode("utf-8")  # a lone surrogate escape ("\ud800") raises here
    return value


def strings_in(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def contains(delivered: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    """What of ``expect`` is not in ``delivered`` as it was sent (nested dicts member by member)."""
    wrong = []
    for key, value in expect.items():
        got = delivered.get(key)
        if isinstance(value, dict) and isinstance(got, dict):
            wrong += [f"{key}.{w}" for w in contains(got, value)]
        elif not same(got, value):
            wrong.append(f"{key}: sent {value!r}, delivered {got!r}")
    return wrong


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, numbers by value (Decimal("1E+2") == Decimal("100.0"))."""
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return isinstance(a, Decimal) and isinstance(b, Decimal) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def delivered_events(bodies: list[bytes]) -> list[dict[str, Any]]:
    """The events of webhook request bodies (one event, or ``{"batch": [...]}``), read strictly."""
    found = []
    for body in bodies:
        value = strict_json(body)
        found += value["batch"] if "batch" in value else [value]
    return found
