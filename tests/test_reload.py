"""Operations around a running trackrelay (issue 13): JSON log lines, SIGHUP reloading sources and
destinations, and orphaned deliveries. Real `trackrelay run` processes, real signals, real sockets."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.operations import Orphan, discard_orphaned, orphaned_destinations
from pipeline.store import Store
from pipeline_harness import Database, Processes, free_port, read_config, wait_for, webhook, write_config


@pytest.fixture
def processes(tmp_path: Path) -> Any:
    running = Processes(tmp_path)
    yield running
    running.kill_leftovers()


def _config(path: Path, url: str, port: int, keys: list[str], destinations: list[dict[str, Any]],
            extra: str = "") -> Path:
    write_config(path, url, destinations, sources=[{"name": "web", "write_keys": keys}],
                 receiver={"port": port})
    if extra:
        path.write_text(extra + "\n" + path.read_text())
    return path


def _track(port: int, key: str, i: int | str, client: httpx.Client | None = None) -> int:
    body = {"type": "track", "event": "e", "userId": "u", "messageId": f"m-{key}-{i}"}
    post = (client or httpx).post
    return post(f"http://127.0.0.1:{port}/v1/track", json=body, auth=(key, ""), timeout=30).status_code


def test_json_log_lines_have_the_fields_and_no_credential(tmp_path: Path, sqlite_url: str, processes: Any) -> None:
    port = free_port()
    path = _config(tmp_path / "t.toml", sqlite_url, port, ["k1"], [], extra='log_format = "json"')
    run = processes.start("run", "--config", str(path))
    run.wait_for_log(r'"role": "worker"')
    run.wait_for_log(r'"event": "started", "role": "receiver"')
    assert _track(port, "k1", 0) == 200
    # A Basic credential in a header Tornado cannot parse: Tornado logs the header's value.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic S0VZOg==\x01\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        sock.settimeout(10)
        try:
            sock.recv(1000)
        except OSError:
            pass
    run.signal(signal.SIGTERM)
    assert run.wait() == 0
    lines = [json.loads(line) for line in run.log.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "pid"} <= set(line) for line in lines)
    listening = next(line for line in lines if line.get("event") == "listening")
    assert listening["port"] == port and listening["processes"] == 1  # clearly numeric: numbers
    assert "S0VZOg" not in run.log


def test_sighup_under_load_keys_destinations_and_a_bad_file(tmp_path: Path, database_url: str,
                                                           processes: Any, sink: Any) -> None:
    port = free_port()
    path = tmp_path / "t.toml"
    old_hook, new_hook = webhook(sink.url + "/old", name="old"), webhook(sink.url + "/new", name="new")
    _config(path, database_url, port, ["k1", "gone"], [old_hook])
    run = processes.start("run", "--config", str(path), "--processes", "2")
    run.wait_for_log(r"event=started role=worker")
    wait_for(lambda: run.log.count("event=started role=receiver") == 2, "two receivers")

    statuses: list[int] = []
    stop = threading.Event()

    def load(thread: int) -> None:
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                statuses.append(_track(port, "k1", f"{thread}-{i}", client))
                i += 1

    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(statuses) > 200, "load before the reload")
    assert _track(port, "new", 0) >= 400  # not a key yet (not counted in statuses: never stored)
    _config(path, database_url, port, ["k1", "new"], [new_hook])
    run.signal(signal.SIGHUP)
    wait_for(lambda: run.log.count("event=reloaded role=") == 3, "three processes reloaded")
    wait_for(lambda: "event=destination_retired destination=old" in run.log, "the old destination retired")
    counted = len(statuses)
    wait_for(lambda: len(statuses) > counted + 200, "load after the reload")
    # Each receiver process answers a key both ways: try a few connections.
    assert all(_track(port, "new", i) == 200 for i in range(10))
    assert all(_track(port, "gone", i) >= 400 for i in range(10))

    # A bad file (invalid TOML, then an unknown key) keeps the running config, saying why.
    path.write_text(path.read_text() + "\n[[sources]\n")
    run.signal(signal.SIGHUP)
    wait_for(lambda: run.log.count("event=reload_refused") == 3, "three refusals")
    _config(path, database_url, port, ["k1"], [new_hook], extra="colour = 1")
    run.signal(signal.SIGHUP)
    wait_for(lambda: run.log.count("event=reload_refused") == 6, "three more refusals")
    assert "unknown section" in run.log and "invalid TOML" in run.log
    assert all(_track(port, "new", 100 + i) == 200 for i in range(10))  # still the good config
    stop.set()
    for thread in threads:
        thread.join(30)

    assert statuses and set(statuses) == {200}, f"answers: {sorted(set(statuses))}"
    database = Database(database_url)
    try:
        sent = len(statuses) + 20
        wait_for(lambda: len(database.events()) == sent, f"{sent} events stored")
        # The new destination gets the events that arrive after the reload; what was routed to
        # the old one and not delivered stays, orphaned.
        wait_for(lambda: sink.counts("/new").keys() >= {f"m-new-{i}" for i in range(10)}, "new key at /new")
        assert not any(e["messageId"].startswith("m-new") for e in sink.events("/old"))
        late = {e["messageId"] for e in sink.events("/new")}
        assert len(late) >= 200
    finally:
        database.dispose()
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


def test_orphans_listed_and_discarded(tmp_path: Path, database_url: str, processes: Any) -> None:
    port = free_port()
    path = tmp_path / "t.toml"
    # A destination nothing answers: its deliveries stay pending.
    _config(path, database_url, port, ["k1"], [webhook(f"http://127.0.0.1:{free_port()}/", name="away",
                                                       retry_initial_seconds=60, retry_max_seconds=60)])
    run = processes.start("run", "--config", str(path))
    run.wait_for_log(r"event=started role=receiver")
    assert all(_track(port, "k1", i) == 200 for i in range(5))
    database = Database(database_url)
    try:
        wait_for(lambda: len(database.deliveries("away")) == 5, "five deliveries")
    finally:
        database.dispose()
    _config(path, database_url, port, ["k1"], [])
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"event=orphaned_destination destination=away pending=5 dead=0")
    config = read_config(path)
    store = Store.open(config.database)
    try:
        assert orphaned_destinations(store, config) == [Orphan("away", 5, 0)]
        configured = read_config(_config(tmp_path / "o.toml", database_url, port, ["k1"],
                                         [webhook("http://127.0.0.1:1/", name="away")]))
        with pytest.raises(ValueError, match="is configured"):
            discard_orphaned(store, configured, "away")
    finally:
        store.dispose()
    status = processes.run("status", "--config", str(path), "--json")
    assert json.loads(status.output)["orphaned"] == ["away"]
    text = processes.run("status", "--config", str(path))
    assert "away (orphaned)" in text.output
    dry = processes.run("discard", "--config", str(path), "--destination", "away", "--dry-run")
    assert dry.popen.returncode == 0 and "would discard 5" in dry.output
    done = processes.run("discard", "--config", str(path), "--destination", "away")
    assert "discarded 5" in done.output
    store = Store.open(config.database)
    try:
        assert orphaned_destinations(store, config) == []
    finally:
        store.dispose()
    run.signal(signal.SIGTERM)
    assert run.wait() == 0
