"""Hostile bodies at every route, through a real receiver and worker to a real webhook sink and a
file destination, on SQLite and Postgres: nested 10k deep, numbers of any size, NaN, invalid
UTF-8, lone surrogates, duplicate keys, NUL, CR LF, compression bombs. Every answer is a clear
4xx in JSON (a pixel: the GIF), never a 5xx; what is valid is delivered as strict JSON with every
number's value as sent; nothing invalid is delivered."""

from __future__ import annotations

import base64
import itertools
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import RunningReceiver, make_config, unique_id
from pipeline import exactjson
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook
from reliability.hostile import (BATCH_PATHS, ENCODINGS, GIF, INGEST_PATHS, PIXEL_PATHS, Hostile, bomb, contains,
                                 delivered_events, gzip_bytes, hostile_bodies_for, hostile_messages, strict_json)

PIXEL_URL_BYTES = 16_000
CONTENT_TYPES = ["application/json", "text/plain", None, "application/x-www-form-urlencoded"]


@pytest.fixture
def pipeline(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink, tmp_path: Path) -> Pipeline:
    """Open mode; every event to the webhook sink and to JSON-lines files."""
    return start_pipeline([webhook(sink.url + "/in"),
                           {"name": "files", "type": "file", "path": str(tmp_path / "events")}])


def file_lines(tmp_path: Path) -> list[bytes]:
    return [line for path in sorted((tmp_path / "events").glob("*.jsonl")) for line in path.read_bytes().splitlines()]


def assert_clear_refusal(response: httpx.Response, what: str) -> None:
    """A 4xx whose JSON body says why."""
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json"), what
    body = strict_json(response.content)
    assert body.get("code") and body.get("message"), (what, body)


def check_delivered(sink: ScriptedSink, tmp_path: Path, accepted: dict[str, Hostile]) -> int:
    """Every accepted message arrives at both destinations, as sent; nothing else arrives."""
    def all_there() -> bool:
        ids = {e["messageId"] for e in delivered_events([r.body for r in sink.sink.requests])}
        return ids >= accepted.keys() and len(file_lines(tmp_path)) >= len(accepted)
    wait_for(all_there, f"{len(accepted)} events at the sink and in the files", timeout=60)
    for where, bodies in (("webhook", [r.body for r in sink.sink.requests]), ("file", file_lines(tmp_path))):
        events = delivered_events(bodies)  # strict: valid UTF-8, no NaN, no lone surrogate
        ids = Counter(e["messageId"] for e in events)
        assert set(ids) == accepted.keys(), (where, set(ids) ^ accepted.keys())
        for event in events:
            hostile = accepted[event["messageId"]]
            wrong = contains(event, hostile.expect or {})
            assert not wrong, (where, hostile.name, wrong)
    return len(accepted)


def test_every_ingest_route_refuses_hostile_bodies_and_delivers_the_valid_exactly(
        pipeline: Pipeline, sink: ScriptedSink, tmp_path: Path, figures: Callable[[str], None]) -> None:
    statuses: Counter[int] = Counter()
    accepted: dict[str, Hostile] = {}
    sent = 0
    encodings = itertools.cycle(ENCODINGS.items())
    content_types = itertools.cycle(CONTENT_TYPES)
    started = time.monotonic()
    for path in INGEST_PATHS:
        for hostile in hostile_bodies_for(path, unique_id):
            encoding, (header, encode) = next(encodings)
            headers = {"Content-Encoding": header}
            content_type = next(content_types)
            if content_type:
                headers["Content-Type"] = content_type
            response = pipeline.receiver.post(path, encode(hostile.body), headers=headers)
            sent += 1
            statuses[response.status_code] += 1
            what = f"{path} {hostile.name} ({encoding})"
            assert "Set-Cookie" not in response.headers, what
            if hostile.accepted:
                assert response.status_code == 200, (what, response.text[:300])
                accepted[hostile.expect["messageId"]] = hostile  # type: ignore[index]
            else:
                assert_clear_refusal(response, what)
    elapsed = time.monotonic() - started
    delivered = check_delivered(sink, tmp_path, accepted)
    assert pipeline.db.states() == Counter({"delivered": 2 * delivered})
    figures(f"hostile bodies: routes={len(INGEST_PATHS)} cases/route={sent // len(INGEST_PATHS)} sent={sent:,} "
            f"in {elapsed:.1f}s statuses={dict(sorted(statuses.items()))} delivered={delivered} x2 destinations, "
            f"each as sent")


def pixel_queries(kind: str, new_id: Callable[[], str]) -> Iterator[tuple[str, str, Hostile | None]]:
    """(name, query string, the message if it is valid) for one pixel route."""
    for n, hostile in enumerate(hostile_messages(kind, new_id)):
        data = base64.urlsafe_b64encode(hostile.body).rstrip(b"=") if n % 2 else base64.b64encode(hostile.body)
        if len(data) > PIXEL_URL_BYTES:
            continue  # URL length limits (414) are tested with the connection limits
        yield hostile.name, "data=" + data.decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"), \
            hostile if hostile.accepted else None
    fields = {"track": "&event=Pix", "group": "&groupId=g1", "alias": "&previousId=p1"}.get(kind, "")
    mid = new_id()
    yield "dotted keys with CR LF and NUL", f"userId=u1&messageId={mid}{fields}&properties.v=a%0D%0Ab%00c", \
        Hostile("dotted", b"", True, {"messageId": mid, "properties": {"v": "a\r\nb\x00c"}})
    mid = new_id()
    yield "a header injection in the key", f"userId=u1&messageId={mid}{fields}&writeKey=k%0D%0ASet-Cookie:%20x=1", \
        Hostile("injection", b"", True, {"messageId": mid, "writeKey": None})  # open mode: any key; never delivered
    for name, query in [("data not UTF-8", "data=%ff%fe"), ("data not base64", "data=!!!"), ("data empty", "data="),
                        ("data of invalid UTF-8", "data=" + base64.b64encode(b'{"userId":"\xff"}').decode()),
                        ("a key not UTF-8", "userId=u1&%ff=1"), ("a value not UTF-8", "userId=%ff"),
                        ("keys that contradict", "userId=u1&a=1&a.b=2"),
                        ("dotted keys 300 deep", "userId=u1&" + ".".join(["p"] * 300) + "=1"),
                        ("nothing", "")]:
        yield name, query, None


def test_every_pixel_answers_the_gif_and_delivers_the_valid_exactly(
        pipeline: Pipeline, sink: ScriptedSink, tmp_path: Path, figures: Callable[[str], None]) -> None:
    statuses: Counter[int] = Counter()
    accepted: dict[str, Hostile] = {}
    sent = 0
    for path in PIXEL_PATHS:
        for name, query, valid in pixel_queries(path.rsplit("/", 1)[-1], unique_id):
            response = pipeline.receiver.get(f"{path}?{query}")
            sent += 1
            statuses[response.status_code] += 1
            what = f"{path} {name}"
            assert (response.status_code, response.headers["Content-Type"]) == (200, "image/gif"), what
            assert response.content == GIF and "Set-Cookie" not in response.headers, what
            if valid is not None:
                accepted[valid.expect["messageId"]] = valid  # type: ignore[index]
    delivered = check_delivered(sink, tmp_path, accepted)
    recorded = Counter(row["code"] for row in pipeline.receiver.rejected())
    assert sum(recorded.values()) == sent - delivered, recorded  # every refusal recorded, with its reason
    figures(f"hostile pixels: routes={len(PIXEL_PATHS)} sent={sent} statuses={dict(statuses)} (all the GIF) "
            f"delivered={delivered} rejected rows={sum(recorded.values())}")


HOSTILE_PARTS = ["%00", "%ff%fe", "%0D%0ASet-Cookie:%20x=1", "..%2F..%2Fetc%2Fpasswd", "%ED%A0%80", "%C0%AF",
                 "x" * 1500, "%25", "%"]


def test_the_other_routes_take_hostile_input_without_a_5xx(pipeline: Pipeline, figures: Callable[[str], None]) -> None:
    client = pipeline.receiver.client
    statuses: Counter[int] = Counter()
    requests: list[tuple[str, str, dict[str, Any]]] = []
    for part in HOSTILE_PARTS:
        requests += [("GET", f"/v1/projects/{part}/settings", {}), ("GET", f"/sourceConfig?writeKey={part}", {}),
                     ("HEAD", f"/sourceConfig/?writeKey={part}", {}),
                     ("GET", f"/analytics.js/v1/{part}/analytics.min.js", {}),
                     ("GET", f"/analytics-next/bundles/{part}", {}), ("GET", f"/v1/{part}", {}),
                     ("POST", f"/v1/{part}", {"content": b"{}"}), ("GET", f"/health?x={part}", {}),
                     ("OPTIONS", "/v1/track", {"headers": {"Origin": "https://a.example",
                                                           "Access-Control-Request-Headers": part}})]
    for hostile in hostile_messages("track", unique_id):
        requests += [("POST", "/v1/m", {"content": hostile.body}), ("PUT", "/v1/track", {"content": hostile.body}),
                     ("DELETE", "/v1/batch", {"content": hostile.body}), ("GET", "/v1/webhook", {})]
    for method, url, kwargs in requests:
        response = client.request(method, url, **kwargs)
        statuses[response.status_code] += 1
        what = f"{method} {url[:80]}"
        assert response.status_code < 500 and "Set-Cookie" not in response.headers, (what, response.text[:300])
        if method not in ("HEAD", "OPTIONS") and response.status_code >= 400:
            assert_clear_refusal(response, what)
    figures(f"hostile input to the other routes: sent={len(requests)} statuses={dict(sorted(statuses.items()))}")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compression_bombs_get_413_at_every_route(pipeline: Pipeline, encoding: str,
                                                  figures: Callable[[str], None]) -> None:
    body = bomb(encoding)  # 200 MB of zeros
    slowest = 0.0
    for path in INGEST_PATHS:
        started = time.monotonic()
        response = pipeline.receiver.post(path, body, headers={"Content-Encoding": encoding})
        slowest = max(slowest, time.monotonic() - started)
        assert_clear_refusal(response, f"{path} {encoding} bomb")
        assert response.status_code == 413, path
    # gzip inside gzip is inflated once: the inner gzip is not JSON.
    response = pipeline.receiver.post("/v1/track", gzip_bytes(gzip_bytes(b'{"userId":"u1","event":"x"}')),
                                      headers={"Content-Encoding": "gzip"})
    assert_clear_refusal(response, "gzip in gzip")
    assert pipeline.receiver.outbox() == []
    figures(f"{encoding} bomb: {len(body):,} bytes sent, 200 MB inflated, to {len(INGEST_PATHS)} routes: all 413, "
            f"slowest {slowest * 1000:.0f} ms")


RAW_REQUESTS = {
    "a bare CR in a header": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-A: a\rSet-Cookie: x=1\r\nContent-Length: 2\r\n\r\n{}",
    "a bare LF in a header": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-A: a\nSet-Cookie: x=1\r\nContent-Length: 2\r\n\r\n{}",
    "a NUL in a header": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nOrigin: https://a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "a folded header": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nOrigin: https://a\r\n Set-Cookie: x=1\r\nContent-Length: 2\r\n\r\n{}",
    "CR LF in the path": b"GET /v1/pixel/track?userId=u1%0D%0ASet-Cookie:x HTTP/1.1\r\nHost: x\r\n\r\n",
    "two Content-Lengths": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "a negative Content-Length": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    "chunked and a length": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"2\r\n{}\r\n0\r\n\r\n",
    "a bad chunk size": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "an unknown encoding": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    "gzip that is not": b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
    "a truncated gzip": b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n"
                        + gzip_bytes(b'{"userId":"u1","event":"x"}')[:10],
}


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; the first answer (head and Content-Length body),
    or what came before the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
            head, found, body = answer.partition(b"\r\n\r\n")
            if found:
                lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")]
                if len(body) >= (int(lengths[0]) if lengths else 0):
                    break
    return answer


def test_malformed_http_and_header_injection_get_a_4xx_and_inject_nothing(
        pipeline: Pipeline, figures: Callable[[str], None]) -> None:
    seen: Counter[str] = Counter()
    for name, request in RAW_REQUESTS.items():
        answer = raw_exchange(pipeline.receiver.port, request)
        status_line, _, rest = answer.partition(b"\r\n")
        head = rest.partition(b"\r\n\r\n")[0]
        assert status_line.startswith(b"HTTP/1.1 "), (name, answer[:200])
        status = int(status_line.split()[1])
        seen[str(status)] += 1
        assert status < 500 and b"set-cookie" not in head.lower(), (name, answer[:300])
        if name == "CR LF in the path":
            assert status == 200 and answer.endswith(GIF), name
        else:
            assert 400 <= status < 500, (name, answer[:300])
    assert pipeline.receiver.outbox() == []
    figures(f"malformed HTTP and header injection: {len(RAW_REQUESTS)} raw requests, statuses={dict(seen)}, "
            f"no header injected")


def test_one_hostile_body_does_not_hold_up_a_batch_of_good_ones(pipeline: Pipeline, sink: ScriptedSink,
                                                                  tmp_path: Path) -> None:
    """A batch mixing valid messages with a lone surrogate, NaN-free but invalid items: the valid
    ones are delivered exactly, the invalid ones listed by index."""
    good = [m for m in hostile_messages(None, unique_id) if m.accepted]
    bad = [b'{"type":"track","event":"x"}', b'{"type":"nope","userId":"u1"}', b'{"type":"identify","userId":{}}']
    body = b'{"batch":[' + b",".join([g.body for g in good] + bad) + b'],"context":{"n":1e-400}}'
    response = pipeline.receiver.post(BATCH_PATHS[0], body)
    assert response.status_code == 207, response.text
    assert [e["Index"] for e in response.json()["Errors"]] == list(range(len(good), len(good) + len(bad)))
    check_delivered(sink, tmp_path, {g.expect["messageId"]: g for g in good})  # type: ignore[index]
    context = strict_json(sink.sink.requests[0].body)["context"]
    assert str(context["n"]) == "1E-400", context  # the batch's context merged, its number exact


@pytest.mark.parametrize("text", ["1e400", "-1E+400", "9" * 5000, "1e-400", "-1.5e-400", "4e-324", "2.5e-320"])
def test_a_number_past_a_doubles_range_keeps_its_text(text: str) -> None:
    """Beyond a double's range (orjson: "infinity") or below its normal range (orjson: 0.0 or a
    rounded subnormal), the number is kept as sent."""
    assert orjson.dumps(exactjson.loads(f'{{"n": {text}}}'.encode())) == f'{{"n":{text}}}'.encode()


@pytest.mark.parametrize("body", [b'{"messageId": "3f5e-4005-8a1b", "a": "page-404", "b": "x1e-400"}',
                                  b'{"anonymousId": "a12e-4567", "t": 1.5e-10, "u": -0.0, "v": "1e-40"}'])
def test_look_alikes_of_a_tiny_exponent_stay_on_the_fast_path(body: bytes) -> None:
    assert not exactjson.may_lose_digits(body)


def test_a_batch_of_50k_empty_messages_is_refused_without_a_5xx(sqlite_url: str,
                                                                 figures: Callable[[str], None]) -> None:
    """50,000 invalid messages in a 150 KB batch (a 500 KB one holds 170,000): one 400 listing
    every one of them (an answer 50x the request: see the figure), and the receiver serves on. (Refused before
    the store: one backend is enough.)"""
    receiver = RunningReceiver(make_config(sqlite_url))
    try:
        body = b'{"batch":[' + b",".join([b"{}"] * 50_000) + b"]}"
        started = time.monotonic()
        response = receiver.post(BATCH_PATHS[0], body)
        elapsed = time.monotonic() - started
        assert_clear_refusal(response, "50k empty messages")
        assert len(response.json()["Errors"]) == 50_000
        assert receiver.post("/v1/track", {"userId": "u1", "event": "after"}).status_code == 200
    finally:
        receiver.stop()
    figures(f"a batch of 50,000 empty messages ({len(body):,} bytes): 400 in {elapsed:.1f}s, "
            f"an answer of {len(response.content):,} bytes")
