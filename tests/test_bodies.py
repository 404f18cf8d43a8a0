"""Request bodies: content types, gzip/deflate, bombs, size limits, and how a 413 reaches the client.

The limits apply to the decompressed bytes; a request over a limit is answered 413 from its
Content-Length when that is known, and while streaming when it is not (chunked).
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from receiver.body import TOO_LARGE, BodyError, BodyReader

TRACK = {"type": "track", "userId": "u1", "event": "Signed Up"}
TRACK_BYTES = b'{"type": "track", "userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"}}'
SUCCESS = {"Success": True}

SINGLE_TOO_LARGE = {"Error": "Bad Request", "Message": "Error reading request body",
                    "Details": "HTTP request too large", "code": "payload_too_large",
                    "message": "Error reading request body"}
BATCH_TOO_LARGE = {"Success": False,
                   "Errors": [{"Error": "Bad Request", "Message": "Error reading request body",
                               "Details": "HTTP request too large", "code": "payload_too_large"}],
                   "code": "payload_too_large", "message": "Error reading request body"}

# Small limits keep the streaming tests fast; they behave as the defaults do, only smaller.
SMALL = {"max_batch_bytes": 2000, "max_call_bytes": 1000, "discard_cap_bytes": 50_000}


def padded_track(size: int) -> bytes:
    """A valid track message of exactly ``size`` bytes."""
    head = b'{"type":"track","userId":"u1","event":"E","properties":{"pad":"'
    tail = b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def padded_message(size: int, index: int) -> dict[str, Any]:
    """A track message whose compact JSON is exactly ``size`` bytes."""
    message = {"type": "track", "userId": f"u{index}", "event": "E", "properties": {"pad": ""}}
    message["properties"]["pad"] = "x" * (size - len(orjson.dumps(message)))
    assert len(orjson.dumps(message)) == size
    return message


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def bomb(inflated: int = 10 * 1024 * 1024) -> bytes:
    return gzip.compress(b"\0" * inflated, compresslevel=9)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def split_answer(raw: bytes) -> tuple[str, dict[str, str], Any]:
    """Status line, headers and JSON body of one raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    assert len(body) == length, "exactly one answer, nothing after it"
    return status, headers, json.loads(body)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


# --- Content types -------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/json", "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None,
])
def test_json_body_is_accepted_whatever_the_content_type(start_receiver: Callable[..., Any],
                                                         content_type: str | None) -> None:
    receiver = start_receiver()
    response = receiver.client.post("/v1/track", content=TRACK_BYTES,
                                    headers={"Content-Type": content_type} if content_type else {})
    assert response.request.headers.get("Content-Type") == content_type
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


# --- Content-Encoding ----------------------------------------------------------------------


@pytest.mark.parametrize("encoding, pack", [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("GZIP", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", raw_deflate),
    ("identity", lambda data: data),
], ids=["gzip", "x-gzip", "upper-case", "zlib-deflate", "raw-deflate", "identity"])
def test_compressed_single_body_is_stored_decompressed(receiver: Any, encoding: str,
                                                       pack: Callable[[bytes], bytes]) -> None:
    response = receiver.post("/v1/track", pack(TRACK_BYTES), headers={"Content-Encoding": encoding})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_batch_is_stored_decompressed(receiver: Any, encoding: str,
                                                 pack: Callable[[bytes], bytes]) -> None:
    body = json.dumps({"batch": [TRACK, {**TRACK, "userId": "u2"}], "sentAt": "2024-01-01T00:00:00Z"},
                      indent=2).encode()
    response = receiver.post("/v1/batch", pack(body), headers={"Content-Encoding": encoding})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [body]


def test_concatenated_gzip_members_are_one_body(receiver: Any) -> None:
    packed = gzip.compress(TRACK_BYTES[:20]) + gzip.compress(TRACK_BYTES[20:])
    response = receiver.post("/v1/track", packed, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


def test_unsupported_encoding_is_415(receiver: Any) -> None:
    response = receiver.post("/v1/track", TRACK_BYTES, headers={"Content-Encoding": "br"})
    assert response.status_code == 415
    assert response.json() == {"Error": "Unsupported Media Type", "Message": "Unsupported Content-Encoding",
                               "Details": "'br' is not one of gzip, deflate, identity",
                               "code": "unsupported_encoding", "message": "Unsupported Content-Encoding"}
    assert receiver.outbox() == []
    assert [(r["status"], r["code"]) for r in receiver.rejected()] == [(415, "unsupported_encoding")]


def test_unsupported_encoding_on_batch_answers_in_batch_format(receiver: Any) -> None:
    response = receiver.post("/v1/batch", {"batch": [TRACK]}, headers={"Content-Encoding": "compress"})
    assert response.status_code == 415
    assert response.json() == {
        "Success": False,
        "Errors": [{"Error": "Unsupported Media Type", "Message": "Unsupported Content-Encoding",
                    "Details": "'compress' is not one of gzip, deflate, identity",
                    "code": "unsupported_encoding"}],
        "code": "unsupported_encoding", "message": "Unsupported Content-Encoding"}


def test_corrupt_gzip_is_400(receiver: Any) -> None:
    response = receiver.post("/v1/track", b"this is not gzip at all", headers={"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert response.json() == {
        "Error": "Bad Request", "Message": "Error reading request body",
        "Details": "the body is not valid gzip (Error -3 while decompressing data: incorrect header check)",
        "code": "invalid_encoding", "message": "Error reading request body"}
    assert receiver.outbox() == []
    assert [(r["status"], r["code"]) for r in receiver.rejected()] == [(400, "invalid_encoding")]


@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_truncated_compressed_body_is_400(receiver: Any, encoding: str, pack: Callable[[bytes], bytes]) -> None:
    packed = pack(TRACK_BYTES)
    response = receiver.post("/v1/track", packed[: len(packed) - 8], headers={"Content-Encoding": encoding})
    assert response.status_code == 400
    assert response.json() == {
        "Error": "Bad Request", "Message": "Error reading request body",
        "Details": "the compressed body ends before its end marker",
        "code": "invalid_encoding", "message": "Error reading request body"}
    assert receiver.outbox() == []


def test_data_after_the_deflate_stream_is_400(receiver: Any) -> None:
    response = receiver.post("/v1/track", zlib.compress(TRACK_BYTES) + b"junk",
                             headers={"Content-Encoding": "deflate"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_encoding"
    assert response.json()["Details"] == ("the body is not valid deflate "
                                          "(data after the end of the compressed stream)")


# --- Gzip bombs ----------------------------------------------------------------------------


def test_gzip_bomb_on_batch_is_413(receiver: Any) -> None:
    packed = bomb()
    assert len(packed) < 20_000
    response = receiver.post("/v1/batch", packed, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (413, BATCH_TOO_LARGE)
    assert receiver.outbox() == []
    rows = receiver.rejected()
    assert [(r["route"], r["status"], r["code"], r["reason"], r["raw"]) for r in rows] == [
        ("batch", 413, "payload_too_large", "Error reading request body: HTTP request too large", None)]


def test_gzip_bomb_on_single_route_is_413(receiver: Any) -> None:
    response = receiver.post("/v1/track", bomb(1024 * 1024), headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (413, SINGLE_TOO_LARGE)
    assert receiver.outbox() == []


def test_compressed_body_that_inflates_just_past_the_limit_is_413(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    at_limit, past_limit = padded_track(1000), padded_track(1001)
    ok = receiver.post("/v1/track", gzip.compress(at_limit), headers={"Content-Encoding": "gzip"})
    assert (ok.status_code, ok.json()) == (200, SUCCESS)
    refused = receiver.post("/v1/track", gzip.compress(past_limit), headers={"Content-Encoding": "gzip"})
    assert (refused.status_code, refused.json()) == (413, SINGLE_TOO_LARGE)
    assert [row["body"] for row in receiver.outbox()] == [at_limit]


def test_compressed_body_a_little_larger_than_it_inflates_is_accepted(start_receiver: Callable[..., Any]) -> None:
    # Stored (level 0) gzip is bigger than its content: its Content-Length must not refuse it.
    receiver = start_receiver(**SMALL)
    body = padded_track(1000)
    packed = gzip.compress(body, compresslevel=0)
    assert len(packed) > 1000
    response = receiver.post("/v1/track", packed, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [body]


# --- BodyReader on its own -----------------------------------------------------------------


def feed_in_pieces(reader: BodyReader, data: bytes, size: int) -> int:
    """Feed ``data`` in pieces; return the most body bytes the reader ever kept."""
    most = 0
    for start in range(0, len(data), size):
        reader.feed(data[start:start + size])
        most = max(most, sum(len(chunk) for chunk in reader._chunks))
    return most


def test_body_reader_never_keeps_more_than_the_limit_of_a_bomb() -> None:
    limit = 100_000
    packed = bomb()
    reader = BodyReader("gzip", limit)
    assert feed_in_pieces(reader, packed, 1024) <= limit + 1
    assert reader.too_large
    assert reader.received == len(packed)
    with pytest.raises(BodyError) as refused:
        reader.finish()
    assert refused.value.problem == TOO_LARGE


def test_body_reader_memory_stays_far_below_the_inflated_bomb() -> None:
    inflated, limit = 10 * 1024 * 1024, 100_000
    packed = bomb(inflated)
    tracemalloc.start()
    try:
        reader = BodyReader("gzip", limit)
        feed_in_pieces(reader, packed, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.too_large
    assert peak < 4 * limit < inflated // 20


def test_body_reader_bomb_in_one_piece_is_refused() -> None:
    reader = BodyReader("gzip", 1000)
    reader.feed(bomb())
    assert reader.too_large
    assert reader._chunks == []
    with pytest.raises(BodyError):
        reader.finish()


@pytest.mark.parametrize("encoding, pack", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", raw_deflate), (None, lambda d: d),
], ids=["gzip", "zlib-deflate", "raw-deflate", "identity"])
def test_body_reader_takes_a_body_exactly_at_the_limit_byte_by_byte(encoding: str | None,
                                                                    pack: Callable[[bytes], bytes]) -> None:
    body = padded_track(300)
    reader = BodyReader(encoding, 300)
    feed_in_pieces(reader, pack(body), 1)
    assert reader.finish() == body


@pytest.mark.parametrize("encoding, pack", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), (None, lambda d: d),
], ids=["gzip", "deflate", "identity"])
def test_body_reader_refuses_one_byte_past_the_limit(encoding: str | None, pack: Callable[[bytes], bytes]) -> None:
    reader = BodyReader(encoding, 300)
    feed_in_pieces(reader, pack(padded_track(301)), 7)
    with pytest.raises(BodyError) as refused:
        reader.finish()
    assert refused.value.problem == TOO_LARGE


def test_body_reader_keeps_counting_what_arrives_after_the_limit() -> None:
    reader = BodyReader(None, 10)
    reader.feed(b"x" * 11)
    reader.feed(b"y" * 100)
    assert (reader.too_large, reader.received, reader._chunks) == (True, 111, [])


def test_body_reader_empty_body_is_empty() -> None:
    assert BodyReader("gzip", 10).finish() == b""
    assert BodyReader(None, 10).finish() == b""


def test_body_reader_single_byte_of_deflate_is_truncated() -> None:
    reader = BodyReader("deflate", 100)
    reader.feed(b"x")
    with pytest.raises(BodyError) as refused:
        reader.finish()
    assert (refused.value.problem.code, refused.value.problem.details) == (
        "invalid_encoding", "the compressed body ends before its end marker")


# --- Size limits ---------------------------------------------------------------------------


def test_single_call_at_the_limit_is_accepted_and_one_byte_more_is_413(receiver: Any) -> None:
    at_limit = padded_track(15360)
    ok = receiver.post("/v1/track", at_limit)
    assert (ok.status_code, ok.json()) == (200, SUCCESS)
    refused = receiver.post("/v1/t", padded_track(15361))
    assert (refused.status_code, refused.json()) == (413, SINGLE_TOO_LARGE)
    assert [row["body"] for row in receiver.outbox()] == [at_limit]
    rows = receiver.rejected()
    assert [(r["route"], r["status"], r["code"]) for r in rows] == [("track", 413, "payload_too_large")]


def test_batch_over_500_kb_is_413(receiver: Any) -> None:
    batch = {"batch": [padded_message(10_000, i) for i in range(52)]}
    body = orjson.dumps(batch)
    assert len(body) > 512_000
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == (413, BATCH_TOO_LARGE)
    assert receiver.outbox() == []
    assert [(r["route"], r["status"], r["code"]) for r in receiver.rejected()] == [
        ("batch", 413, "payload_too_large")]


def test_batch_under_500_kb_of_messages_under_15_kb_is_accepted(receiver: Any) -> None:
    body = orjson.dumps({"batch": [padded_message(15360, i) for i in range(33)]})
    assert 500_000 < len(body) <= 512_000
    response = receiver.post("/v1/import", body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [body]


def test_one_oversize_message_in_a_batch_is_one_failed_item(receiver: Any) -> None:
    body = orjson.dumps({"batch": [padded_message(500, 0), padded_message(15361, 1), padded_message(15360, 2)]})
    response = receiver.post("/v1/batch", body)
    assert response.status_code == 207
    assert response.json() == {
        "Success": False,
        "Errors": [{"Error": "Bad Request", "Message": "Message too large",
                    "Details": "message is 15361 bytes, the limit is 15360", "Index": 1,
                    "code": "message_too_large"}],
        "code": "partial_success", "message": "1 of 3 messages were rejected"}
    assert [row["body"] for row in receiver.outbox()] == [body]
    assert receiver.rejected() == []


def test_batch_message_is_measured_as_compact_json(receiver: Any) -> None:
    # 15 360 bytes compact, far more once indented: the message is within its limit.
    body = json.dumps({"batch": [padded_message(15360, 0)]}, indent=8, separators=(" ,  ", " :  ")).encode()
    assert len(body) > 15360 + 100
    response = receiver.post("/v1/batch", body)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [body]


def test_batch_where_every_message_is_oversize_is_413(receiver: Any) -> None:
    body = orjson.dumps({"batch": [padded_message(16000, 0), padded_message(15361, 1)]})
    response = receiver.post("/v1/batch", body)
    assert response.status_code == 413
    assert response.json() == {
        "Success": False,
        "Errors": [{"Error": "Bad Request", "Message": "Message too large",
                    "Details": "message is 16000 bytes, the limit is 15360", "Index": 0,
                    "code": "message_too_large"},
                   {"Error": "Bad Request", "Message": "Message too large",
                    "Details": "message is 15361 bytes, the limit is 15360", "Index": 1,
                    "code": "message_too_large"}],
        "code": "message_too_large", "message": "Message too large"}
    assert receiver.outbox() == []
    assert [(r["status"], r["code"]) for r in receiver.rejected()] == [(413, "message_too_large")]


def test_single_message_posted_to_the_webhook_is_held_to_the_single_limit(receiver: Any) -> None:
    response = receiver.post("/v1/webhook", padded_track(15361))
    assert (response.status_code, response.json()) == (413, SINGLE_TOO_LARGE)
    assert receiver.outbox() == []


# --- How the 413 reaches the client ---------------------------------------------------------


def test_content_length_over_the_limit_is_answered_413_and_the_connection_stays_usable(
        start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)
    try:
        conn.request("POST", "/v1/track", body=b"x" * 20_000)
        refused = conn.getresponse()
        assert (refused.status, json.loads(refused.read())) == (413, SINGLE_TOO_LARGE)
        # The body was read and thrown away: the same connection takes the next request.
        conn.request("POST", "/v1/track", body=TRACK_BYTES)
        accepted = conn.getresponse()
        assert (accepted.status, json.loads(accepted.read())) == (200, SUCCESS)
    finally:
        conn.close()
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


def test_content_length_over_the_discard_cap_is_answered_before_the_body(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        # Headers only: the answer comes from Content-Length alone, then the connection closes.
        sock.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
        status, headers, body = split_answer(read_until_closed(sock))
    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert headers["access-control-allow-origin"] == "*"
    assert body == BATCH_TOO_LARGE
    assert receiver.outbox() == []


def test_expect_continue_over_the_limit_is_413_without_the_body(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nContent-Length: 1500\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        status, _, body = split_answer(read_until_closed(sock))
    assert status == "HTTP/1.1 413 Request Entity Too Large"  # and no "100 Continue" before it
    assert body == SINGLE_TOO_LARGE
    assert receiver.outbox() == []


def test_expect_continue_within_the_limit_gets_100_then_200(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(TRACK_BYTES))
        interim = sock.recv(len(b"HTTP/1.1 100 (Continue)\r\n\r\n"))
        assert interim == b"HTTP/1.1 100 (Continue)\r\n\r\n"
        sock.sendall(TRACK_BYTES)
        status, _, body = split_answer(read_until_closed(sock))
    assert (status, body) == ("HTTP/1.1 200 OK", SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


def chunked(data: bytes, size: int, last: bool = True) -> bytes:
    pieces = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(pieces) + (b"0\r\n\r\n" if last else b"")


def test_chunked_body_within_the_limit_is_accepted(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(TRACK_BYTES, 10))
        status, _, body = split_answer(read_until_closed(sock))
    assert (status, body) == ("HTTP/1.1 200 OK", SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


def test_chunked_body_over_the_limit_is_413(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"y" * 20_000, 500))
        status, _, body = split_answer(read_until_closed(sock))
    assert (status, body) == ("HTTP/1.1 413 Request Entity Too Large", BATCH_TOO_LARGE)
    assert receiver.outbox() == []
    assert [(r["route"], r["status"], r["code"]) for r in receiver.rejected()] == [
        ("batch", 413, "payload_too_large")]


def test_chunked_gzip_bomb_is_413(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/b HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Encoding: gzip\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(bomb(), 1000))
        status, _, body = split_answer(read_until_closed(sock))
    assert (status, body) == ("HTTP/1.1 413 Request Entity Too Large", BATCH_TOO_LARGE)
    assert receiver.outbox() == []


@pytest.mark.parametrize("declared", [1000, 200_000], ids=["small-chunks", "one-large-chunk"])
def test_chunked_body_over_the_discard_cap_is_413_and_closed(start_receiver: Callable[..., Any],
                                                             declared: int) -> None:
    receiver = start_receiver(**SMALL)
    sent = b"z" * 65_536  # past the 50 000 byte cap
    body = chunked(sent, declared, last=False) if declared < len(sent) else b"%x\r\n" % declared + sent
    with connect(receiver.port) as sock:
        # No end to the body: the answer must come while it streams, then the connection closes.
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        status, _, answer = split_answer(read_until_closed(sock))
    assert (status, answer) == ("HTTP/1.1 413 Request Entity Too Large", SINGLE_TOO_LARGE)
    assert receiver.outbox() == []


def test_an_answer_given_before_the_body_says_the_connection_closes(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nContent-Length: 1500\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        status, headers, _ = split_answer(read_until_closed(sock))
    assert (status, headers["connection"]) == ("HTTP/1.1 413 Request Entity Too Large", "close")


def test_a_content_length_sent_twice_with_one_value_is_that_length(start_receiver: Callable[..., Any]) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(TRACK_BYTES), len(TRACK_BYTES), TRACK_BYTES))
        status, _, body = split_answer(read_until_closed(sock))
    assert (status, body) == ("HTTP/1.1 200 OK", SUCCESS)
    assert [row["body"] for row in receiver.outbox()] == [TRACK_BYTES]


@pytest.mark.parametrize("length", [b"abc", b"10, 12", b"-5", b"+5"])
def test_a_content_length_that_is_not_one_number_is_a_400_and_nothing_is_stored(
        start_receiver: Callable[..., Any], length: bytes, caplog: pytest.LogCaptureFixture) -> None:
    receiver = start_receiver(**SMALL)
    with connect(receiver.port) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: t\r\nContent-Length: %s\r\n\r\n%s" % (length, TRACK_BYTES))
        answer = read_until_closed(sock)
    # Tornado's own framing check answers: a message whose length is unknown cannot be read.
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert receiver.outbox() == []
    assert "Uncaught exception" not in caplog.text
