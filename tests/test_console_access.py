"""Who may use the console (receiver/admin/access.py): the token as a bearer or through the
login form's session, CSRF on the dashboard's form posts, /metrics and /health open to a
scraper, a token-less console only on loopback and only for loopback Host names; and the
console as `trackrelay run` starts it: its URL printed, one process serving it."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import unique_id
from console_harness import RunningConsole, with_console
from http_sink import Answer
from pipeline_harness import COMMAND, Pipeline, Processes, ScriptedSink, free_port, wait_for, webhook, write_config

TOKEN = "s3cret-admin-token"


@pytest.fixture
def console(start_pipeline: Callable[..., Pipeline], sink: ScriptedSink) -> Iterator[tuple[RunningConsole, Pipeline]]:
    sink.decide = lambda n, r: Answer(500) if r.path == "/bad" else Answer()
    pipeline = start_pipeline([webhook(sink.url + "/bad", name="bad", max_attempts=1)])
    running = RunningConsole(with_console(pipeline.config, token=TOKEN))
    yield running, pipeline
    running.stop()


def anonymous(running: RunningConsole) -> httpx.Client:
    return httpx.Client(base_url=running.url, timeout=30, follow_redirects=False)


def xsrf_of(html: str) -> str:
    match = re.search(r'name="_xsrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1)


def test_the_api_needs_the_token_and_metrics_and_health_do_not(
        console: tuple[RunningConsole, Pipeline]) -> None:
    running, _ = console
    with anonymous(running) as client:
        refused = client.get("/api/overview")
        assert refused.status_code == 401 and refused.json()["status"] == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert client.get("/api/overview", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/overview", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert client.get("/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.post("/api/replay", json={"destination": "bad"}).status_code == 401
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "trackrelay_outbox_pending" in metrics.text
        page = client.get("/failures?state=dead")
        assert page.status_code == 302 and page.headers["Location"] == "/login?next=%2Ffailures%3Fstate%3Ddead"
        assert TOKEN not in refused.text


def test_logging_in_sets_a_strict_http_only_session_and_forms_need_the_csrf_field(
        console: tuple[RunningConsole, Pipeline], sink: ScriptedSink) -> None:
    running, pipeline = console
    message_id = unique_id()
    assert pipeline.receiver.post("/v1/track", {"userId": "u", "event": "E", "messageId": message_id}).status_code == 200
    wait_for(lambda: pipeline.db.states("bad") == {"dead": 1}, "the delivery to go dead")
    with anonymous(running) as client:
        form = client.get("/login", params={"next": "/failures"})
        assert form.status_code == 200 and 'type="password"' in form.text
        field = xsrf_of(form.text)
        assert client.post("/login", data={"token": TOKEN, "next": "/failures"}).status_code == 403  # no CSRF field
        wrong = client.post("/login", data={"token": "guess", "next": "/failures", "_xsrf": field})
        assert wrong.status_code == 401 and "not the admin token" in wrong.text
        assert "trackrelay_session" not in client.cookies
        right = client.post("/login", data={"token": TOKEN, "next": "/failures", "_xsrf": field})
        assert right.status_code == 303 and right.headers["Location"] == "/failures"
        cookie = next(h for h in right.headers.get_list("Set-Cookie") if h.startswith("trackrelay_session="))
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "expires" not in cookie.lower()
        # With JavaScript off the failures page lists the dead delivery and replays it by a form.
        page = client.get("/failures")
        assert page.status_code == 200 and message_id in page.text
        delivery_id = re.search(r'name="one" value="(\d+)"', page.text).group(1)
        sink.decide = lambda n, r: Answer()
        forged = client.post("/failures/replay", data={"one": delivery_id, "back": "/failures"})
        assert forged.status_code == 403 and pipeline.db.states("bad") == {"dead": 1}
        replayed = client.post("/failures/replay", data={"one": delivery_id, "back": "/failures",
                                                        "_xsrf": xsrf_of(page.text)})
        assert replayed.status_code == 303 and replayed.headers["Location"] == "/failures?replayed=1"
        wait_for(lambda: pipeline.db.states("bad") == {"delivered": 1}, "the replayed delivery to arrive")
        assert client.get("/api/overview").status_code == 200  # the session works for the API too
        logout = client.post("/logout", data={"_xsrf": xsrf_of(page.text)})
        assert logout.status_code == 303
        assert client.get("/api/overview").status_code == 401


def test_everything_the_filter_matches_is_replayed_after_a_confirmation_with_the_count(
        console: tuple[RunningConsole, Pipeline], sink: ScriptedSink) -> None:
    running, pipeline = console
    for _ in range(3):
        pipeline.receiver.post("/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()})
    pipeline.receiver.post("/v1/page", {"userId": "u", "messageId": unique_id()})
    wait_for(lambda: pipeline.db.states("bad") == {"dead": 4}, "four dead deliveries")
    sink.decide = lambda n, r: Answer()
    page = running.get("/failures", params={"type": "track"})
    field = xsrf_of(page.text)
    confirm = running.post("/failures/replay", data={"all": "1", "state": "dead", "type": "track", "_xsrf": field,
                                                     "back": "/failures?type=track"})
    assert confirm.status_code == 200 and "Replay 3 deliveries?" in confirm.text
    assert pipeline.db.states("bad") == {"dead": 4}  # nothing until confirmed
    done = running.post("/failures/replay", data={"all": "1", "confirmed": "1", "state": "dead", "type": "track",
                                                  "_xsrf": xsrf_of(confirm.text), "back": "/failures?type=track"})
    assert done.status_code == 303 and done.headers["Location"] == "/failures?type=track&replayed=3"
    wait_for(lambda: pipeline.db.states("bad") == {"delivered": 3, "dead": 1}, "the three tracks delivered")


def test_after_login_only_a_path_here_is_followed(console: tuple[RunningConsole, Pipeline]) -> None:
    running, _ = console
    with anonymous(running) as client:
        field = xsrf_of(client.get("/login").text)
        for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            answer = client.post("/login", data={"token": TOKEN, "next": target, "_xsrf": field})
            assert answer.status_code == 303 and answer.headers["Location"] == "/", target


def test_without_a_token_only_loopback_host_names_are_answered(start_pipeline: Callable[..., Pipeline],
                                                               sink: ScriptedSink) -> None:
    pipeline = start_pipeline([webhook(sink.url + "/good", name="good")])
    running = RunningConsole(with_console(pipeline.config))
    try:
        assert running.get("/api/overview").status_code == 200
        for host in ("localhost:8089", "[::1]:8089", "127.0.0.2"):
            assert running.get("/api/overview", headers={"Host": host}).status_code == 200, host
        rebound = running.get("/api/overview", headers={"Host": "attacker.example:8089"})
        assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]
        assert running.get("/", headers={"Host": "attacker.example"}).status_code == 403
    finally:
        running.stop()


def trackrelay_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_ADMIN_")}
    return env | settings


def test_a_token_less_console_on_a_public_address_is_refused_at_start(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path / "t.toml", sqlite_url, [])
    done = subprocess.run(COMMAND + ["run", "--config", str(config)], capture_output=True, text=True, timeout=60,
                          env=trackrelay_env(TRACKRELAY_ADMIN_HOST="0.0.0.0"), cwd=tmp_path)
    assert done.returncode == 2
    assert "[admin] host: '0.0.0.0' is not a loopback address and no [admin] token is set" in done.stderr
    with_token = subprocess.run(COMMAND + ["status", "--config", str(config)], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path,
                                env=trackrelay_env(TRACKRELAY_ADMIN_HOST="0.0.0.0", TRACKRELAY_ADMIN_TOKEN="t"))
    assert with_token.returncode != 2, with_token.stderr


def test_run_prints_the_console_url_and_one_process_of_several_serves_it(
        tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    admin_port = free_port()
    config = write_config(tmp_path / "t.toml", sqlite_url, [], receiver={"port": free_port(), "processes": 2})
    monkeypatch.setenv("TRACKRELAY_ADMIN_PORT", str(admin_port))
    processes = Processes(tmp_path)
    try:
        run = processes.start("run", "--config", str(config))
        url = f"http://127.0.0.1:{admin_port}/"
        wait_for(lambda: url in run.output, "the console's URL on stdout")
        pids = set()
        for _ in range(20):  # a new connection each time: the kernel spreads them over listeners
            with httpx.Client(timeout=10) as client:
                pids.add(client.get(url + "health").json()["pid"])
        assert len(pids) == 1
        assert run.log.count("event=console_listening") == 1
    finally:
        processes.kill_leftovers()
