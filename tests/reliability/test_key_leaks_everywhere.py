"""No write key where it should not be, however it was sent: a real ``trackrelay run`` at DEBUG,
on SQLite and Postgres, is sent a valid and an invalid key every way a client can send one
(Basic auth with and without the colon, a newline, malformed base64, control bytes; Bearer; the
body's and each message's writeKey; ?writeKey= plain, URL-encoded, with %ff and CR LF; pixel
data and pixel query keys; the SDK routes; X-Forwarded-* and Origin headers; raw malformed
requests). Neither key, in any of its spellings (raw, base64, URL-encoded, a distinctive middle
part), may then be found in the receiver's and the worker's log, in any answer's status line,
headers or body, in what the destinations received (a destination's own configured key aside),
in the ``rejected`` table's reasons, in the deliveries' errors, or in the output of
``trackrelay status`` and ``trackrelay replay --dry-run``.

(``outbox`` rows keep the request as received, key included, and ``rejected.raw`` the first
bytes of a refused input: the database is where keys live. tests/test_key_leaks.py covers the
log filter on its own and the webhook ?writeKey=%ff case; this goes wider.)
"""

from __future__ import annotations

import base64
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx

from http_sink import Answer, Recorded
from pipeline_harness import Database, Processes, ScriptedSink, free_port, wait_for, webhook, write_config

VALID = "wk_Sup3r/Secret+Key=9"
INVALID = "wk_Bogus/Wrong+Key=7"
DESTINATION_KEY = "dest-own-Key-5"  # the webhook destination's own header: it may go to the sink


def spellings(key: str) -> set[str]:
    """Every form in which a key could be found again."""
    forms = {key, quote(key, safe=""), quote_plus(key), quote(key, safe="").lower(), key.split("_", 1)[1][:12]}
    for text in (f"{key}:", key, f"{key}:\n"):
        encoded = base64.b64encode(text.encode()).decode()
        forms |= {encoded, encoded.rstrip("="), base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")}
    return forms


FORBIDDEN = spellings(VALID) | spellings(INVALID)


def leaks(where: str, text: str | bytes) -> list[str]:
    data = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return [f"{where}: {form!r}" for form in sorted(FORBIDDEN) if form in data]


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def track(key_member: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": "u1", "event": "Keyed", **extra}
    if key_member is not None:
        body["writeKey"] = key_member
    return body


def requests_with_keys() -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(name, method, url, httpx arguments) for every way of sending a key, valid and not."""
    for label, key in (("valid", VALID), ("invalid", INVALID)):
        for form in (f"{key}:", key, f"{key}:\n"):
            yield f"{label} Basic {form!r}", "POST", "/v1/track", {"json": track(), "headers": {"Authorization": basic(form)}}
        yield f"{label} Basic not base64", "POST", "/v1/track", {"json": track(), "headers": {"Authorization": f"Basic {key}"}}
        yield f"{label} Bearer", "POST", "/v1/identify", {"json": {"userId": "u1"}, "headers": {"Authorization": f"Bearer {key}"}}
        yield f"{label} body key", "POST", "/v1/track", {"json": track(key)}
        yield f"{label} body key, invalid message", "POST", "/v1/track", {"json": {"writeKey": key, "event": 5}}
        yield f"{label} body key, invalid JSON", "POST", "/v1/t", {"content": f'{{"writeKey":"{key}", "userId":'}
        yield f"{label} batch key", "POST", "/v1/batch", {"json": {"batch": [track(), {"type": "nope"}], "writeKey": key}}
        yield f"{label} message keys", "POST", "/v1/import", {"json": {"batch": [{**track(key), "type": "track"}]}}
        yield f"{label} key not a string", "POST", "/v1/track", {"json": track(None, writeKey={"k": key})}
        encoded = quote(key, safe="")
        for query in (f"writeKey={encoded}", f"writeKey={key}", f"writeKey={encoded}%ff", f"writeKey=%0D%0A{encoded}",
                      f"writeKey={encoded}&writeKey={encoded}%00"):
            yield f"{label} webhook ?{query}", "POST", f"/v1/webhook?{query}", {"json": {"type": "track", **track()}}
        yield f"{label} ?writeKey on a track route", "POST", f"/v1/track?writeKey={encoded}", {"json": track()}
        data = base64.urlsafe_b64encode(f'{{"userId":"u1","event":"Px","writeKey":"{key}"}}'.encode()).decode()
        bad_data = base64.b64encode(f'{{"writeKey":"{key}","event":7}}'.encode()).decode()
        yield f"{label} pixel data", "GET", f"/v1/pixel/track?data={data}", {}
        yield f"{label} pixel data, invalid", "GET", f"/v1/pixel/track?data={quote(bad_data)}", {}
        yield f"{label} pixel query", "GET", f"/v1/pixel/page?userId=u1&writeKey={encoded}", {}
        yield f"{label} pixel query, not UTF-8", "GET", f"/v1/pixel/page?userId=u1&writeKey={encoded}%ff", {}
        yield f"{label} pixel Basic", "GET", "/v1/pixel/identify?userId=u1", {"headers": {"Authorization": basic(f"{key}:")}}
        yield f"{label} sourceConfig", "GET", f"/sourceConfig/?writeKey={encoded}", {}
        yield f"{label} sourceConfig, not UTF-8", "GET", f"/sourceConfig?writeKey={encoded}%ff", {}
        yield f"{label} sourceConfig Basic", "HEAD", "/sourceConfig", {"headers": {"Authorization": basic(f"{key}:")}}
        yield f"{label} settings, no route", "GET", f"/v1/projects/{encoded}/settingz", {}
        yield f"{label} bundle", "GET", f"/analytics.js/v1/{encoded}/analytics.min.js", {}
        yield f"{label} forwarded headers", "POST", "/v1/track", {"json": track(), "headers": {
            "X-Forwarded-For": key, "X-Real-Ip": key, "X-Forwarded-Host": key, "X-Forwarded-Proto": key,
            "Authorization": basic(f"{key}:")}}
        yield f"{label} Origin", "POST", "/v1/track", {"json": track(key), "headers": {"Origin": f"https://{encoded}.example"}}
        # (A preflight's Access-Control-Request-Headers is echoed, as CORS wants: header names, not keys.)
        yield f"{label} preflight", "OPTIONS", "/v1/track", {"headers": {
            "Origin": "https://a.example", "Access-Control-Request-Headers": "authorization",
            "Authorization": basic(f"{key}:")}}
        yield f"{label} wrong method", "PUT", "/v1/track", {"json": track(key), "headers": {"Authorization": basic(key)}}
    # The one answer that carries a key by design: analytics-next's settings for a valid key
    # (its apiKey). Only the invalid key is tried here.
    yield "invalid settings", "GET", f"/v1/projects/{quote(INVALID, safe='')}/settings", {}


RAW = [b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: " + basic(f"{k}:").encode()
       + b"\x01\r\n\r\n{}" for k in (VALID, INVALID)] + \
      [b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: Basic " + k.encode()
       + b"\r\n\x00\r\n\r\n{}" for k in (VALID, INVALID)] + \
      [b"GET /v1/pixel/track?writeKey=" + quote(k, safe="").encode() + b"\r\n HTTP/1.1\r\nHost: x\r\n\r\n"
       for k in (VALID, INVALID)]



def raw_answer(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        conn.settimeout(5)
        while b"\r\n\r\n" not in answer and (chunk := conn.recv(65536)):
            answer += chunk
        return answer


def test_no_key_sent_any_way_is_found_anywhere(database_url: str, tmp_path: Path, sink: ScriptedSink,
                                               figures: Callable[[str], None]) -> None:
    sink.decide = lambda n, r: Answer(400, b"refused") if r.path == "/dead" else Answer()
    config = write_config(tmp_path / "trackrelay.toml", database_url, [
        webhook(sink.url + "/in", headers={"X-Api-Key": DESTINATION_KEY}),
        webhook(sink.url + "/dead", name="dead"),
        {"name": "files", "type": "file", "path": str(tmp_path / "events")}],
        sources=[{"name": "site", "write_keys": [VALID]}],
        receiver={"host": "127.0.0.1", "port": free_port(), "trust_forwarded_headers": True})
    port = int(config.read_text().split("port = ")[1].split()[0])
    processes = Processes(tmp_path)
    run = processes.start("run", "--config", str(config), "--log-level", "DEBUG")
    database = Database(database_url)
    try:
        run.wait_for_log("event=started role=receiver")
        run.wait_for_log("event=started role=worker")
        found: list[str] = []
        statuses: Counter[int] = Counter()
        sent = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for name, method, url, kwargs in requests_with_keys():
                response = client.request(method, url, **kwargs)
                sent += 1
                statuses[response.status_code] += 1
                assert response.status_code < 500, (name, response.text)
                head = f"{response.status_code} {response.reason_phrase}\n" + "\n".join(
                    f"{k}: {v}" for k, v in response.headers.multi_items())
                found += leaks(f"answer to {name}", head + "\n" + response.text)
        for request in RAW:
            answer = raw_answer(port, request)
            sent += 1
            assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
            found += leaks(f"answer to {request[:40]!r}", answer)
        wait_for(lambda: len(database.deliveries("hook")) >= 10 and database.states("hook") == {
            "delivered": len(database.deliveries("hook"))} and database.states("dead") == {
            "dead": len(database.deliveries("dead"))}, "every accepted event delivered (and dead at 'dead')")
        accepted = database.deliveries("hook")
        sink_requests: list[Recorded] = list(sink.sink.requests)
        assert any(r.headers.get("X-Api-Key") == DESTINATION_KEY for r in sink_requests)  # the search can find
        for recorded in sink_requests:
            headers = {k: v for k, v in recorded.headers.items() if k != "X-Api-Key"}
            found += leaks(f"sink {recorded.path}", f"{recorded.path} {headers} " + recorded.body.decode("utf-8", "replace"))
        for path in sorted((tmp_path / "events").glob("*.jsonl")):
            found += leaks(f"file {path.name}", path.read_bytes())
        rejected = database.engine.connect()
        try:
            rows = [dict(r._mapping) for r in rejected.exec_driver_sql(
                "SELECT route, source, code, reason, remote_addr, raw FROM rejected")]
            errors = [r[0] for r in rejected.exec_driver_sql("SELECT last_error FROM deliveries WHERE last_error IS NOT NULL")]
        finally:
            rejected.close()
        for row in rows:
            found += leaks(f"rejected {row['code']}", " ".join(str(row[k]) for k in ("route", "source", "code", "reason",
                                                                                  "remote_addr")))
        found += leaks("deliveries.last_error", "\n".join(errors))
        raw_with_key = sum(1 for row in rows if row["raw"] and leaks("raw", bytes(row["raw"])))
        outputs = []
        # (Each command is a second of start-up: the table and one replay of each kind.)
        for args in (["status"], ["replay", "--destination", "dead", "--dry-run"],
                     ["replay", "--destination", "files", "--from-outbox", "--since", "1h", "--dry-run"]):
            command = processes.run(*args, "--config", str(config), "--log-level", "DEBUG")
            assert command.popen.returncode == 0, (args, command.log)
            outputs.append(command.output)
            found += leaks(f"trackrelay {' '.join(args)}", command.output + command.log)
        assert "would replay 1" in outputs[1] or "would replay" in outputs[1]
        assert "dead" in outputs[0] and "would replay" in outputs[2]
        run.signal(15)
        assert run.wait() == 0
        found += leaks("the DEBUG log of receiver and worker", run.log + run.output)
        assert "Invalid header value [not logged" in run.log  # Tornado's line about the raw \x01 header
        assert not found, "\n".join(found)
    finally:
        database.dispose()
        processes.kill_leftovers()
    figures(f"key leaks: {sent} requests carrying a valid or an invalid key ({len(FORBIDDEN)} spellings searched), "
            f"statuses={dict(sorted(statuses.items()))}, {len(accepted)} events delivered, {len(rows)} rejected rows, "
            f"log {len(run.log.splitlines())} lines at DEBUG: no key in any log line, answer, delivery, "
            f"rejected reason, status or replay output (rejected.raw keeps the input: {raw_with_key} rows)")
