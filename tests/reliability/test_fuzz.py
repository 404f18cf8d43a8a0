"""A hypothesis fuzzer over routes x bodies x encodings x auth, against a real receiver and worker
(closed mode: one source, one valid key) delivering to a real webhook sink, on SQLite and
Postgres. Bodies are written byte by byte (numbers of any length, duplicate keys, lone
surrogates, invalid UTF-8, NUL, control characters, truncation), then maybe compressed.

What must hold: no 5xx, no hang (every answer within 10 s), no crash (the receiver and the
worker still serve and deliver afterwards); every answer a clear JSON (or, for a pixel, the GIF);
every message acknowledged is delivered; everything delivered is strict JSON and carries the ids
and properties it was sent with, every number's value exact.

CI runs a fixed seed (``derandomize``) of ``EXAMPLES`` examples per backend; set
``TRACKRELAY_FUZZ_EXAMPLES`` for a longer run.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.messages import MESSAGE_TYPES
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook
from reliability.hostile import (BATCH_PATHS, ENCODINGS, EXACT_NUMBERS, GIF, INGEST_PATHS, PIXEL_PATHS, SINGLE_PATHS,
                                 WEBHOOK_PATHS, route_type, strict_json)

# Read at import: the suite's autouse fixture clears TRACKRELAY_* before each test runs.
EXAMPLES = int(os.environ.get("TRACKRELAY_FUZZ_EXAMPLES", "100"))
KEY = "fuzz-Key/9+valid="
ID_FIELDS = ("userId", "anonymousId", "groupId", "previousId", "event", "name")
COMPARED = ID_FIELDS + ("properties", "traits")


# --- writing JSON by hand ------------------------------------------------------------------------

@dataclass(frozen=True)
class Number:
    text: str


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are, inside a string or between members: what no JSON library writes."""
    data: bytes


@dataclass(frozen=True)
class Obj:
    members: tuple[tuple[str, Any], ...]  # a tuple of pairs: duplicate keys allowed


def escaped(text: str) -> bytes:
    """``text`` as a JSON string's inside: UTF-8, or with a lone surrogate, all escaped (then refused)."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return json.dumps(text)[1:-1].encode()
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


def write(value: Any) -> bytes:
    if isinstance(value, Obj):
        return b"{" + b",".join(b'"' + escaped(k) + b'":' + write(v) for k, v in value.members) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(write(v) for v in value) + b"]"
    if isinstance(value, Number):
        return value.text.encode()
    if isinstance(value, Raw):
        return b'"' + value.data + b'"'
    if isinstance(value, str):
        return b'"' + escaped(value) + b'"'
    return json.dumps(value).encode()  # True, False, None


# --- strategies ------------------------------------------------------------------------------------

def number_texts() -> st.SearchStrategy[str]:
    return st.one_of(
        valid_number_texts(),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1", "0x10", "1e", "--1"]))  # invalid


def valid_number_texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EXACT_NUMBERS),
        st.integers(-(10**40), 10**40).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.builds(lambda m, f, e: f"{m}.{f}e{e}", st.integers(-999, 999), st.integers(0, 10**20),
                  st.integers(-420, 420)))


def leaves(hostile: bool) -> st.SearchStrategy[Any]:
    valid = st.one_of(st.none(), st.booleans(), valid_number_texts().map(Number), st.text(max_size=20),
                      st.sampled_from([Raw(b"\\u0000"), Raw(b"\\r\\n"), Raw(b"\\ud83d\\ude00")]))
    if not hostile:
        return valid
    return st.one_of(
        valid, number_texts().map(Number),
        st.text(st.characters(codec=None, categories=None), max_size=8),  # surrogates included
        st.sampled_from([Raw(b"\xff"), Raw(b"a\x00b"), Raw(b"\xed\xa0\x80"), Raw(b"\\ud800"), Raw(b"\\udc00x"),
                         Raw(b"\r\n"), Raw(b"\xc0\xaf"), Raw(b"\\x41")]))


def values(hostile: bool = True) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.sampled_from(["a", "n", "plan", "", "\x00", "userId", "$set"]), st.text(max_size=6))
    return st.recursive(leaves(hostile), lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(keys, inner), max_size=4).map(lambda m: Obj(tuple(m)))), max_leaves=12)


def objects() -> st.SearchStrategy[Obj]:
    """A JSON object of valid values (duplicate keys possible: the last one wins)."""
    return st.lists(st.tuples(st.text(max_size=6), values(hostile=False)), max_size=4).map(lambda m: Obj(tuple(m)))


def ids() -> st.SearchStrategy[Any]:
    return st.one_of(st.text(min_size=1, max_size=12), number_texts().map(Number), st.none(), st.just(""),
                     values())


@dataclass
class Sent:
    """One message as sent, with the messageId that finds it at the sink."""
    message_id: str
    body: bytes


@st.composite
def messages(draw: st.DrawFn, kind: str | None, hostile: bool) -> tuple[Obj, str]:
    message_id = str(uuid.uuid4())  # not drawn: every example's messages are new to the dedup window
    members: list[tuple[str, Any]] = []
    declared = draw(st.sampled_from([kind, kind, None, "track", "identify", "nope", 7] if hostile
                                     else [kind] if kind else list(MESSAGE_TYPES)))
    if declared is not None:
        members.append(("type", declared))
    members.append(("messageId", message_id))
    optional = ("properties", "traits", "context") if not hostile else \
        ID_FIELDS + ("properties", "traits", "context", "timestamp", "writeKey", "integrations")
    for name in draw(st.lists(st.sampled_from(optional), max_size=6)):
        if name in ("properties", "traits", "context", "integrations"):
            members.append((name, draw(objects() if not hostile else values())))
        elif name == "timestamp":
            members.append((name, draw(st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", "9999-12-31T23:59:59-02:00"]))))
        elif name == "writeKey":
            members.append((name, draw(st.sampled_from([KEY, "wrong-key", 5]))))
        else:
            members.append((name, draw(ids())))
    if not hostile or draw(st.booleans()):  # an identity and what the type needs
        members += [("userId", draw(st.text(min_size=1, max_size=8))), ("event", "Fuzzed"), ("groupId", "g"),
                    ("previousId", "p")]
    return Obj(tuple(draw(st.permutations(members)))), message_id


@dataclass
class Case:
    path: str
    body: bytes
    encoding: str
    headers: dict[str, str]
    query: str
    sent: list[Sent] = field(default_factory=list)
    valid: bool = False  # valid JSON, messages and key: must be taken whole


AUTH = ["none", "basic", "basic-no-colon", "basic-newline", "basic-wrong", "basic-malformed", "bearer", "body", "query",
        "query-wrong", "query-not-utf8"]
VALID_AUTH = {"basic", "basic-no-colon", "basic-newline", "body", "query"}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(INGEST_PATHS + PIXEL_PATHS))
    kind = route_type(path) if path in SINGLE_PATHS or path in PIXEL_PATHS else None
    count = draw(st.integers(1, 3)) if path in BATCH_PATHS or (path in WEBHOOK_PATHS and draw(st.booleans())) else 1
    hostile = draw(st.booleans())  # else valid JSON, a valid message and a valid key, however sent
    drawn = [draw(messages(kind, hostile)) for _ in range(count)]
    auth = draw(st.sampled_from(AUTH if hostile else [a for a in AUTH if a in VALID_AUTH]))
    if auth == "query" and path not in WEBHOOK_PATHS and not hostile:
        auth = "body"  # only webhooks take ?writeKey=
    headers: dict[str, str] = {}
    query = ""
    basic = {"basic": f"{KEY}:", "basic-no-colon": KEY, "basic-newline": f"{KEY}:\n", "basic-wrong": "nope:"}
    if auth in basic:
        headers["Authorization"] = "Basic " + base64.b64encode(basic[auth].encode()).decode()
    elif auth == "basic-malformed":
        headers["Authorization"] = "Basic " + KEY + "!!"
    elif auth == "bearer":
        headers["Authorization"] = "Bearer " + KEY
    elif auth.startswith("query"):
        query = {"query": "writeKey=" + KEY.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D"),
                 "query-wrong": "writeKey=nope", "query-not-utf8": "writeKey=%ff%fe"}[auth]
    members = [m for m, _ in drawn]
    if auth == "body":
        members = [Obj(m.members + (("writeKey", KEY),)) for m in members]
    if count > 1 or path in BATCH_PATHS:
        envelope: list[tuple[str, Any]] = [("batch", members)]
        if draw(st.booleans()):
            envelope.append(("context", draw(values() if hostile else objects())))
        body = write(Obj(tuple(envelope)))
    else:
        body = write(members[0])
    mutation = draw(st.sampled_from(["none"] * 3 + ["truncate", "flip", "insert"])) if hostile else "none"
    if mutation != "none" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = {"truncate": body[:at],
                "flip": body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:],
                "insert": body[:at] + draw(st.sampled_from([b"\x00", b"\xff", b",", b"}", b"\\", b'"']))
                + body[at:]}[mutation]
    encoding = draw(st.sampled_from(list(ENCODINGS) + (["lying gzip"] if hostile else [])))
    content_type = draw(st.sampled_from(["application/json", "text/plain", None]))
    if content_type:
        headers["Content-Type"] = content_type
    return Case(path, body, encoding, headers, query, [Sent(i, write(m)) for (m, i) in drawn], valid=not hostile)


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Tally:
    per_route: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    sent: dict[str, Sent] = field(default_factory=dict)  # every message sent, by messageId
    acknowledged: set[str] = field(default_factory=set)  # those a 200/207 said were taken
    slowest: float = 0.0


def send(client: httpx.Client, case: Case, tally: Tally) -> None:
    url = case.path + ("?" + case.query if case.query else "")
    started = time.monotonic()
    if case.path in PIXEL_PATHS:
        data = base64.urlsafe_b64encode(case.body).decode()
        response = client.get(f"{case.path}?data={data}" + ("&" + case.query if case.query else ""),
                              headers=case.headers)
    else:
        header, encode = ENCODINGS.get(case.encoding, ("gzip", lambda b: b))  # "lying gzip": plain bytes
        response = client.post(url, content=encode(case.body), headers={**case.headers, "Content-Encoding": header})
    tally.slowest = max(tally.slowest, time.monotonic() - started)
    tally.per_route[case.path] += 1
    tally.statuses[response.status_code] += 1
    what = (case.path, case.encoding, case.headers, case.query, case.body[:300])
    assert response.status_code < 500, (what, response.text[:300])
    for sent in case.sent:
        tally.sent[sent.message_id] = sent
    if case.path in PIXEL_PATHS:
        assert (response.status_code, response.content) == (200, GIF), what
        return  # a pixel's answer says nothing of what was taken
    assert response.headers["Content-Type"].startswith("application/json"), what
    answer = strict_json(response.content)
    if response.status_code >= 400:
        assert answer.get("code") and not case.valid, (what, answer)
        return
    assert response.status_code in (200, 207), what
    assert response.status_code == 200 or not case.valid, (what, answer)
    failed = {e.get("Index") for e in answer.get("Errors", [])}
    for index, sent in enumerate(case.sent):
        if index not in failed:
            tally.acknowledged.add(sent.message_id)


def check_deliveries(sink: ScriptedSink, tally: Tally) -> tuple[int, int]:
    """Every acknowledged message delivered, everything delivered valid and as sent; returns
    (delivered, of which matched to what was sent)."""
    def delivered() -> list[dict[str, Any]]:
        return [strict_json(r.body) for r in list(sink.sink.requests)]
    wait_for(lambda: tally.acknowledged <= {e.get("messageId") for e in delivered()},
             f"the {len(tally.acknowledged)} acknowledged messages at the sink", timeout=60)
    events = delivered()  # strict: valid UTF-8, no NaN or Infinity, no lone surrogate
    matched = 0
    for event in events:
        assert "writeKey" not in event, event
        sent = tally.sent.get(event.get("messageId"))
        if sent is None:
            continue  # a mutated body whose messageId changed, or a pixel's: valid is all we can say
        original = strict_json(sent.body)  # what was sent as a message; accepted, so it must parse
        for key in COMPARED:
            if key in original and original[key] not in (None, ""):
                assert same_json(event.get(key), original[key]), (key, original, event)
        matched += 1
    return len(events), matched


def same_json(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b  # Decimals compare by value: 1E+2 == 100.0


@pytest.fixture
def fuzzed(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> Pipeline:
    return start_pipeline([webhook(sink.url + "/in")], sources=[{"name": "fuzz", "write_keys": [KEY]}])


def test_fuzzed_requests_get_no_5xx_and_deliver_only_what_was_sent(
        fuzzed: Pipeline, sink: ScriptedSink, figures: Callable[[str], None]) -> None:
    tally = Tally()
    client = httpx.Client(base_url=fuzzed.receiver.url, timeout=10)  # a hang is a ReadTimeout: a failure

    @settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def property_holds(case: Case) -> None:
        send(client, case, tally)

    started = time.monotonic()
    try:
        property_holds()
    finally:
        client.close()
    elapsed = time.monotonic() - started
    # No crash: both still serve, and a last event goes all the way.
    assert fuzzed.receiver.get("/health").status_code == 200
    last = str(uuid.uuid4())
    response = fuzzed.receiver.post("/v1/track", {"userId": "u", "event": "after", "messageId": last, "writeKey": KEY})
    assert response.status_code == 200
    tally.acknowledged.add(last)
    tally.sent[last] = Sent(last, json.dumps({"userId": "u", "event": "after"}).encode())
    delivered, matched = check_deliveries(sink, tally)
    assert fuzzed.db.states().keys() <= {"delivered"}
    figures(f"fuzz: {sum(tally.per_route.values())} requests in {elapsed:.1f}s over {len(tally.per_route)} routes "
            f"(min {min(tally.per_route.values())}, max {max(tally.per_route.values())} a route) "
            f"statuses={dict(sorted(tally.statuses.items()))} slowest={tally.slowest * 1000:.0f}ms "
            f"acknowledged={len(tally.acknowledged)} delivered={delivered} (matched to what was sent: {matched}), "
            f"all strict JSON")
