"""The webhook's keep-alive HTTP/1.1 client against scripted servers on loopback sockets.

Each server is a real asyncio TCP (or TLS) server whose handler writes exactly the bytes a
test needs: chunked answers, answers ended by a close, connections dropped at awkward moments.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from http_sink import closed_port_url
from pipeline.destinations.httpclient import (
    MAX_BODY_BYTES, ClientClosed, ConnectError, HttpClient, ReadTimeout, RemoteProtocolError, Response)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """Counts connections and keeps every request's raw bytes; ``handler`` answers each
    connection (called with the connection's number, from 0)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self.connections = self.connections, self.connections + 1
        try:
            await self.handler(reader, writer, number)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@asynccontextmanager
async def scripted(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Scripted]:
    script = Scripted(handler)
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0, ssl=ssl_context)
    script.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    async with server:
        yield script


def client(script: Scripted, scheme: str = "http", timeout: float = 5.0, **kwargs: object) -> HttpClient:
    return HttpClient(scheme, "127.0.0.1", script.port, timeout=timeout, pool_size=2, **kwargs)  # type: ignore[attr-defined]


def post(body: bytes = b'{"a":1}', host: str = "127.0.0.1") -> bytes:
    return b"POST /in HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """Read a request and write the next answer, for as long as there are answers."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        for answer in answers:
            await script_of[0].read_request(reader)
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await reader.read()  # keep the connection open until the client closes it
    script_of: list[Scripted] = []
    handler.script_of = script_of  # type: ignore[attr-defined]
    return handler


@asynccontextmanager
async def serving(*answers: bytes, then_close: bool = False) -> AsyncIterator[Scripted]:
    handler = answering(*answers, then_close=then_close)
    async with scripted(handler) as script:
        handler.script_of.append(script)  # type: ignore[attr-defined]
        yield script


async def send_all(http: HttpClient, count: int) -> list[Response]:
    try:
        return [await http.send(post()) for _ in range(count)]
    finally:
        await http.aclose()


def test_a_content_length_answer_is_read_and_the_request_arrives_as_written() -> None:
    async def main() -> None:
        async with serving(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Thing: a\r\nx-thing: b\r\n\r\nhello") as script:
            [response] = await send_all(client(script), 1)
            assert response == Response(201, {"content-length": "5", "x-thing": "a, b"}, b"hello")
            assert script.requests == [post()]
    asyncio.run(main())


def test_a_chunked_answer_with_extensions_and_trailers_is_joined_and_the_connection_kept() -> None:
    chunked = (b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def main() -> None:
        async with serving(chunked, chunked) as script:
            responses = await send_all(client(script), 2)
            assert [(r.status_code, r.text) for r in responses] == [(400, "hello world")] * 2
            assert (script.connections, len(script.requests)) == (1, 2)
    asyncio.run(main())


def test_an_answer_written_a_byte_at_a_time_is_parsed() -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await script.read_request(reader)
        for i in range(len(answer)):
            writer.write(answer[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        await reader.read()

    async def main() -> None:
        nonlocal script
        async with scripted(handler) as script:
            [response] = await send_all(client(script), 1)
            assert (response.status_code, response.content) == (200, b"abc")
    script: Scripted
    asyncio.run(main())


def test_an_answer_without_a_length_ends_at_the_close_and_the_next_request_opens_a_connection() -> None:
    async def main() -> None:
        async with serving(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", then_close=True) as script:
            http = client(script)
            first = await http.send(post())
            assert (first.status_code, first.content) == (200, b"until the end")
            second = await http.send(post())
            await http.aclose()
            assert (second.content, script.connections) == (b"until the end", 2)
    asyncio.run(main())


def test_connection_close_in_the_answer_makes_the_next_request_use_a_new_connection() -> None:
    async def main() -> None:
        async with serving(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n") as script:
            responses = await send_all(client(script), 3)
            assert ([r.status_code for r in responses], script.connections) == ([200] * 3, 3)
    asyncio.run(main())


def test_a_kept_alive_connection_the_server_drops_unanswered_is_retried_once_on_a_fresh_one() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await script.read_request(reader)
        writer.write(ok)
        if number == 0:  # answer the first request, then read the second and drop the connection
            await script.read_request(reader)
            return
        await reader.read()

    async def main() -> None:
        nonlocal script
        async with scripted(handler) as script:
            responses = await send_all(client(script), 2)
            assert [r.content for r in responses] == [b"ok", b"ok"]
            assert (script.connections, script.requests) == (2, [post()] * 3)
    script: Scripted
    asyncio.run(main())


def test_a_new_connection_closed_without_an_answer_is_an_error_and_not_sent_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await script.read_request(reader)

    async def main() -> None:
        nonlocal script
        async with scripted(handler) as script:
            with pytest.raises(RemoteProtocolError, match="server closed the connection without answering"):
                await send_all(client(script), 1)
            assert (script.connections, len(script.requests)) == (1, 1)
    script: Scripted
    asyncio.run(main())


def test_a_connection_closed_mid_answer_is_an_error() -> None:
    async def main() -> None:
        async with serving(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", then_close=True) as script:
            with pytest.raises(RemoteProtocolError, match="mid-answer"):
                await send_all(client(script), 1)
    asyncio.run(main())


def test_no_answer_within_the_timeout_is_a_read_timeout_and_the_connection_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await script.read_request(reader)
        if number == 1:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await reader.read()

    async def main() -> None:
        nonlocal script
        async with scripted(handler) as script:
            http = client(script, timeout=0.2)
            with pytest.raises(ReadTimeout) as raised:
                await http.send(post())
            assert isinstance(raised.value, TimeoutError)
            second = await http.send(post())
            await http.aclose()
            assert (second.status_code, script.connections) == (204, 2)
    script: Scripted
    asyncio.run(main())


def test_a_refused_connection_is_a_connect_error() -> None:
    port = int(closed_port_url().rsplit(":", 1)[1])

    async def main() -> None:
        http = HttpClient("http", "127.0.0.1", port, timeout=5, pool_size=1)
        with pytest.raises(ConnectError):
            await http.send(post())
    asyncio.run(main())


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    # int() would read these; HTTP numbers are digits only
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nhellohello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"])
def test_an_answer_that_is_not_http_is_a_protocol_error(answer: bytes) -> None:
    async def main() -> None:
        async with serving(answer) as script:
            with pytest.raises(RemoteProtocolError):
                await send_all(client(script), 1)
    asyncio.run(main())


def test_an_informational_answer_is_skipped_and_a_gzip_body_decoded() -> None:
    body = gzip.compress(b'{"Errors": []}')
    answer = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 207 Multi-Status\r\nContent-Encoding: gzip\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> None:
        async with serving(answer) as script:
            [response] = await send_all(client(script), 1)
            assert (response.status_code, response.content) == (207, b'{"Errors": []}')
    asyncio.run(main())


def test_repeated_copies_of_one_content_length_are_that_length() -> None:
    async def main() -> None:
        async with serving(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
                           b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nworld") as script:
            responses = await send_all(client(script), 2)
            assert [r.content for r in responses] == [b"hello", b"world"]
            assert script.connections == 1
    asyncio.run(main())


def test_chunked_wins_over_a_content_length_and_that_connection_is_not_reused() -> None:
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"

    async def main() -> None:
        async with serving(both, both) as script:
            responses = await send_all(client(script), 2)
            assert [r.content for r in responses] == [b"hello", b"hello"]
            assert script.connections == 2
    asyncio.run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Thing: a\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Thing: a\r\n\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Thing: a\r\n\r\nok",
    b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nX-Thing: a\n\n2\r\nok\r\n0\r\nX-Trailer: t\n\n",
    b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nX-Thing: a\n\n2\r\nok\r\n0\r\n\n"])
def test_a_head_with_bare_lf_line_ends_is_read_and_the_connection_kept(answer: bytes) -> None:
    async def main() -> None:
        async with serving(answer, answer) as script:
            responses = await send_all(client(script, timeout=2.0), 2)
            assert [(r.status_code, r.headers["x-thing"], r.content) for r in responses] == [(200, "a", b"ok")] * 2
            assert script.connections == 1
    asyncio.run(main())


def test_a_body_of_exactly_the_limit_is_whole_and_the_connection_kept() -> None:
    body = b"x" * MAX_BODY_BYTES
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def main() -> None:
        async with serving(answer, answer) as script:
            responses = await send_all(client(script), 2)
            assert [(r.content == body, r.truncated) for r in responses] == [(True, False)] * 2
            assert script.connections == 1
    asyncio.run(main())


def big_answer(framing: str) -> bytes:
    body = b"x" * (MAX_BODY_BYTES + 1)
    if framing == "content-length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    if framing == "chunked":
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return b"HTTP/1.1 200 OK\r\n\r\n" + body  # ends at the close


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
def test_a_body_over_the_limit_is_an_answer_cut_at_the_limit_and_its_connection_closed(framing: str) -> None:
    # Not an error: the destination took the request, and an error would send it again.
    async def main() -> None:
        answer = big_answer(framing)
        async with serving(answer, answer, then_close=framing == "until-close") as script:
            responses = await send_all(client(script), 2)
            for response in responses:
                assert (response.status_code, len(response.content), response.truncated) == (200, MAX_BODY_BYTES, True)
            assert script.connections == 2
    asyncio.run(main())


def test_a_gzip_body_inflating_past_the_limit_is_cut_there_and_the_connection_kept() -> None:
    bomb = gzip.compress(b"\0" * (MAX_BODY_BYTES * 3), 9)  # ~50 KiB on the wire
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb)

    async def main() -> None:
        async with serving(answer, answer) as script:
            responses = await send_all(client(script), 2)
            assert [(len(r.content), r.truncated) for r in responses] == [(MAX_BODY_BYTES, True)] * 2
            assert script.connections == 1  # the framing was sound: only the inflating stopped
    asyncio.run(main())


def test_an_undecodable_gzip_body_keeps_its_status_as_a_truncated_answer() -> None:
    whole = gzip.compress(b'{"Errors": []}')
    broken = whole[:10] + b"not deflate" + whole[10:]
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(broken), broken)
    cut = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 20\r\n\r\n%s" % whole[:20]

    async def main() -> None:
        async with serving(answer, cut) as script:
            responses = await send_all(client(script), 2)
            assert [(r.status_code, r.content, r.truncated) for r in responses] == [
                (400, b"", True), (200, gzip.decompress(whole)[:len(responses[1].content)], True)]
            assert script.connections == 1
    asyncio.run(main())


def test_a_closed_client_opens_no_connection_and_cuts_off_a_request_in_flight() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await script.read_request(reader)  # the second request is never answered
        await reader.read()

    async def main() -> None:
        nonlocal script
        async with scripted(handler) as script:
            http = client(script)
            await http.send(post())
            pending = asyncio.create_task(http.send(post()))  # on the kept connection
            while len(script.requests) < 2:
                await asyncio.sleep(0.01)
            await http.aclose()
            with pytest.raises(ClientClosed, match="HTTP client closed"):
                await pending  # not sent again on a fresh connection, as a server's drop would be
            with pytest.raises(ClientClosed, match="no new connections"):
                await http.send(post())
            assert (script.connections, len(script.requests)) == (1, 2)
    script: Scripted
    asyncio.run(main())


def test_a_cancelled_request_closes_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await script.read_request(reader)
        if number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    async def main() -> None:
        nonlocal script
        async with scripted(handler) as script:
            http = client(script)
            pending = asyncio.create_task(http.send(post()))
            while not script.requests:
                await asyncio.sleep(0.01)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            second = await http.send(post())
            await http.aclose()
            assert (second.status_code, script.connections) == (200, 2)
    script: Scripted
    asyncio.run(main())


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_talks_to_a_trusted_certificate_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
        async with scripted(handler, server_context) as script:
            handler.script_of.append(script)  # type: ignore[attr-defined]
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await send_all(client(script, "https"), 1)
            [response] = await send_all(client(script, "https", ssl_context=trusting), 1)
            assert (response.status_code, response.content, script.requests) == (200, b"secret", [post()])
    asyncio.run(main())


def test_the_host_header_leaves_out_the_schemes_default_port() -> None:
    def authority(scheme: str, host: str, port: int | None) -> str:
        return HttpClient(scheme, host, port, timeout=1, pool_size=1).authority

    assert [authority("http", "example.com", None), authority("https", "example.com", 443),
            authority("http", "example.com", 8080), authority("https", "::1", 8443)] == [
        "example.com", "example.com", "example.com:8080", "[::1]:8443"]
