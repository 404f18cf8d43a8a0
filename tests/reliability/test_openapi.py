"""OpenAPI: receiver/openapi.json describes the public API, is shipped in the package and served
at ``/openapi.json``, and schemathesis, run against a live ``trackrelay serve`` (a real process on
127.0.0.1, SQLite and Postgres), finds no server error and no answer the document does not
describe: every status documented, every content type, body and header as documented, schema-
violating requests refused, undocumented methods answered 405 with ``Allow``.

The run is derandomized (a fixed seed): the same cases every time. Its size is
``TRACKRELAY_SCHEMATHESIS_EXAMPLES`` examples per operation for the fuzzing phase (default 6); set it higher
for a longer run.

Two receivers, each with the first-party bundle served from a folder of two small files. On
SQLite, in open mode, every operation gets schemathesis's coverage phase (boundary and negative
cases, the same every run) and its fuzzing phase: a request is refused there for its shape only,
so a document stricter than the server shows at once. On Postgres, in closed mode (one source,
one key), the fuzzing phase on every operation but the aliases: the key goes as Basic auth, and
the path's and query's ``writeKey`` (and a chunk's name) are drawn from a dictionary holding the
real one half the time, so the known-key and unknown-key answers are both exercised.

Not checked: ``positive_data_acceptance`` (that every schema-valid request is accepted). The
document describes what is refused exactly where JSON Schema can (types, required fields, ids,
``messageId``, the shape of a batch), and as a superset where it cannot: a write key's validity
depends on the configuration, a timestamp's on the calendar, and limits on sizes and nesting
depth on the bytes sent. Those requests are schema-valid and refused with a documented 400.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from openapi_spec_validator import validate

from conftest import POSTGRES_ADMIN_URL
from pipeline.config import ReceiverConfig
from pipeline.migrate import upgrade
from pipeline_harness import Process, Processes, free_port, wait_for, write_config
from receiver.app import routes
from receiver.ingest import ingest_routes

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "receiver" / "openapi.json"
EXAMPLES = int(os.environ.get("TRACKRELAY_SCHEMATHESIS_EXAMPLES", "6"))
KEY = "wk_openapi_test"
CHUNK = "ajs-destination.bundle.0123abcd.js"
START_SECONDS = 60.0
SEED = 20_241_212
FAILED = -1  # the tally's status for a case that failed a check


def document() -> dict[str, Any]:
    return json.loads(SHIPPED.read_bytes())


# -- the document ---------------------------------------------------------------------------------

def test_document_is_valid_openapi_31(figures: Any) -> None:
    spec = document()
    validate(spec)  # openapi-spec-validator: the OpenAPI 3.1 meta-schema and its own rules
    assert spec["openapi"].startswith("3.1.")
    operations = [(path, method) for path, item in spec["paths"].items()
                  for method in resolve(spec, item) if method in HTTP_METHODS]
    figures(f"openapi.json: {len(spec['paths'])} paths, {len(operations)} operations, valid OpenAPI {spec['openapi']}")


HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")


def resolve(spec: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """A path item, following its ``$ref`` (components/pathItems)."""
    while "$ref" in item:
        node: Any = spec
        for part in item["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        item = node
    return item


def concrete(path: str, spec: dict[str, Any]) -> list[str]:
    """A documented path with its parameters given values they accept: each of an enum's, else one."""
    item = resolve(spec, spec["paths"][path])
    parameters = list(item.get("parameters", []))
    for method in HTTP_METHODS:
        parameters += item.get(method, {}).get("parameters", [])
    urls = [path]
    for name in re.findall(r"\{([^}]+)\}", path):
        described = [resolve(spec, p) for p in parameters if resolve(spec, p).get("in") == "path"
                     and resolve(spec, p)["name"] == name]
        assert described, f"{path}: path parameter {name} is not described"
        values = described[0]["schema"].get("enum", ["x"])
        urls = [url.replace("{" + name + "}", str(value)) for url in urls for value in values]
    return urls


def test_every_route_is_described_and_every_described_path_is_a_route(figures: Any) -> None:
    """The router's table (receiver/app.py, receiver/ingest.py) against the document's paths: a
    route added without its description, or a described path no route serves, fails here."""
    spec = document()
    fake_ctx = SimpleNamespace(config=SimpleNamespace(receiver=ReceiverConfig(browser_sdk_dir="")))  # only read for the table
    patterns = [re.compile(pattern) for pattern, *_ in routes(fake_ctx)]  # type: ignore[arg-type]
    patterns += [re.compile(re.escape(path)) for path in ingest_routes()]
    described = {url: path for path in spec["paths"] for url in concrete(path, spec)}
    unserved = sorted({path for url, path in described.items() if not any(p.fullmatch(url) for p in patterns)})
    assert not unserved, f"described, but no route serves them: {unserved}"
    undescribed = [p.pattern for p in patterns if not any(p.fullmatch(url) for url in described)]
    assert not undescribed, f"routes the document does not describe: {undescribed}"
    figures(f"routes: {len(patterns)} patterns served, {len(spec['paths'])} paths described, none missing either way")


def test_the_package_ships_the_document(tmp_path: Path, figures: Any) -> None:
    """A wheel built from the project (what a non-editable install unpacks) holds the file. Built
    from a copy, so that no build/ folder lands in the working tree."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("receiver", "pipeline", "migrations"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("trackrelay-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("receiver/openapi.json") == SHIPPED.read_bytes()
    installed = importlib.resources.files("receiver").joinpath("openapi.json").read_bytes()
    assert installed == SHIPPED.read_bytes()
    figures(f"package: {wheel.name} holds receiver/openapi.json ({len(installed):,} bytes)")


# -- the live receiver ----------------------------------------------------------------------------

@dataclass
class Live:
    backend: str
    url: str
    process: Process
    tally: Counter[tuple[str, int]] = field(default_factory=Counter)


def bundle_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "standalone.js").write_text("window.analyticsTest = 1;\n", encoding="utf-8")
    (folder / CHUNK).write_text("window.analyticsChunk = 1;\n", encoding="utf-8")
    return folder



def serving(backend: str, url: str, folder: Path, closed: bool) -> Iterator[Live]:
    """``trackrelay serve`` on ``url`` (migrated) until the module is done; ``closed``: one source
    with one key (else open mode: every key, and none, accepted)."""
    sources = [{"name": "site", "write_keys": [KEY]}] if closed else []
    config = write_config(folder / "trackrelay.toml", url, [], sources=sources,
                          receiver={"browser_sdk_dir": str(bundle_folder(folder / "sdk"))})
    # Conformance, not durability: SQLite commits without waiting for the disk (WAL, NORMAL).
    text = config.read_text(encoding="utf-8").replace("[database]\n", "[database]\nsqlite_synchronous = \"NORMAL\"\n")
    config.write_text(text, encoding="utf-8")
    port = free_port()
    processes = Processes(folder)
    process = processes.start("serve", "--config", str(config), "--port", str(port))
    running = Live(backend, f"http://127.0.0.1:{port}", process)
    try:
        wait_for(lambda: healthy(running), "trackrelay serve to answer /health", START_SECONDS)
        yield running
    finally:
        processes.kill_leftovers()
    assert "Traceback" not in process.log, process.log[-5000:]


@pytest.fixture(scope="module")
def sqlite_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("openapi-sqlite")
    url = f"sqlite:///{folder / 'trackrelay.db'}"
    engine = sa.create_engine(url)
    upgrade(engine)
    engine.dispose()
    yield from serving("sqlite", url, folder, closed=False)


@pytest.fixture(scope="module")
def postgres_live(tmp_path_factory: pytest.TempPathFactory, postgres_template: str) -> Iterator[Live]:
    name = f"trackrelay_openapi_{os.getpid()}"
    url = postgres_database(postgres_template, name)
    try:
        yield from serving("postgres", url, tmp_path_factory.mktemp("openapi-postgres"), closed=True)
    finally:
        admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request: pytest.FixtureRequest) -> Live:
    return request.getfixturevalue(f"{request.param}_live")


def postgres_database(template: str, name: str) -> str:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    admin.dispose()
    return sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def healthy(running: Live) -> bool:
    assert running.process.popen.poll() is None, f"trackrelay exited:\n{running.process.log}"
    try:
        return httpx.get(f"{running.url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_served_document_is_the_shipped_file(live: Live, figures: Any) -> None:
    response = httpx.get(f"{live.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.content == SHIPPED.read_bytes()
    refused = httpx.post(f"{live.url}/openapi.json", timeout=10)
    assert (refused.status_code, refused.headers.get("allow")) == (405, "GET")
    figures(f"{live.backend}: GET /openapi.json answers the shipped {len(response.content):,} bytes; POST 405 Allow: GET")


# -- schemathesis against it ----------------------------------------------------------------------

# The aliases (/v1/t for /v1/track, ...) are served by the same code as their routes: the
# Postgres run, which is about the other store under the same code, leaves them out.
ALIASES = ["/v1/i", "/v1/t", "/v1/p", "/v1/s", "/v1/g", "/v1/a", "/v1/import", "/v1/b", "/v1/w",
           "/v1/projects/{writeKey}/settings/", "/sourceConfig/"]


def schemathesis_config(phases: tuple[str, ...], examples: int) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"max-examples": examples, "mode": "all", "deterministic": True, "database": "none"},
        "phases": {name: {"enabled": name in phases} for name in ("examples", "coverage", "fuzzing", "stateful")},
        "checks": {"enabled": True, "positive_data_acceptance": {"enabled": False}},
        "auth": {"basic": {"username": KEY, "password": ""}},
        "dictionaries": {"keys": {"values": [KEY]}, "chunks": {"values": [CHUNK]}},
        "parameters": {"writeKey": {"dictionary": "keys", "probability": 0.5},
                       "file": {"dictionary": "chunks", "probability": 0.5}},
        "request-timeout": 30,
    })


# The shipped file, one test per operation, each sent to the live receiver of its backend.
# (schemathesis.pytest.from_fixture, which would load /openapi.json from the live receiver, sets
# pytest's private Function._nodeid, gone in pytest 9: an AttributeError before any case runs.)
# SQLite, in open mode (a request is refused for its shape only, so a schema stricter than the
# server shows): every operation, the coverage phase (schemathesis's boundary and negative cases,
# the same every run) and the fuzzing phase. Postgres, in closed mode (unknown keys refused, the
# settings and bundle 404 for them): the fuzzing phase, without the aliases.
FULL = schemathesis.openapi.from_path(SHIPPED, config=schemathesis_config(("coverage", "fuzzing"), EXAMPLES))
LIGHT = schemathesis.openapi.from_path(SHIPPED, config=schemathesis_config(("fuzzing",), EXAMPLES)).exclude(path=ALIASES)


def call_and_check(case: schemathesis.Case, live: Live) -> None:
    response = case.call(base_url=live.url)
    live.tally[(case.operation.label, response.status_code)] += 1
    try:
        case.validate_response(response)
    except BaseException:
        live.tally[(case.operation.label, FAILED)] += 1
        raise


@FULL.parametrize()
def test_schemathesis_sqlite(case: schemathesis.Case, sqlite_live: Live) -> None:
    call_and_check(case, sqlite_live)


@pytest.mark.postgres
@LIGHT.parametrize()
def test_schemathesis_postgres(case: schemathesis.Case, postgres_live: Live) -> None:
    call_and_check(case, postgres_live)


def operations_of(schema: Any) -> set[str]:
    return {result.ok().label for result in schema.get_all_operations()}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_schemathesis_figures(backend: str, request: pytest.FixtureRequest, figures: Any) -> None:
    """After the run on this backend (pytest runs this module's tests in file order): every
    operation got requests, none failed a check, none got a 5xx; the figures."""
    live: Live = request.getfixturevalue(f"{backend}_live")
    operations = operations_of(FULL if backend == "sqlite" else LIGHT)
    statuses: Counter[int] = Counter()
    for (_, status), count in live.tally.items():
        statuses[status] += count
    failures = statuses.pop(FAILED, 0)
    tested = {operation for operation, _ in live.tally}
    spread = " ".join(f"{status}:{count:,}" for status, count in sorted(statuses.items()))
    figures(f"{backend}: schemathesis {schemathesis.__version__}, seed {SEED}, {len(tested)} of "
            f"{len(operations)} operations, {sum(statuses.values()):,} requests, statuses {spread}, "
            f"{failures} failing")
    assert tested == operations, f"never tested: {sorted(operations - tested)} (run the whole module)"
    assert failures == 0
    assert not [status for status in statuses if status >= 500]
