"""R1, R2, R3 and R7's receiver half: ``trackrelay serve`` under wrk, next to its ceilings.

Each run starts a fresh server on a fresh database, checks that what wrk will send is answered
200, runs wrk, and then checks that at least as many outbox rows were committed as wrk counted
answers (a 200 means committed). Figure and ceilings alternate run by run.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from pipeline.schema import outbox

from bench.backlog import open_store
from bench.databases import Database
from bench.load import WrkResult, post_checked, run_wrk
from bench.messages import AUTHORIZATION, batch_body, track_body
from bench.processes import BenchError, RssSampler
from bench.report import Figure, Target
from bench.servers import start_hello, start_receiver
from bench.session import Session

WARM_UP = 20


@dataclass(frozen=True)
class Ingest:
    wrk: WrkResult
    peak_rss_mb: float


def _committed(database: Database) -> int:
    store = open_store(database)
    try:
        with store.engine.connect().execution_options(readonly=True) as conn:
            return conn.execute(select(func.count()).select_from(outbox)).scalar_one()
    finally:
        store.dispose()


def receiver_run(session: Session, backend: str, path: str, body: bytes, synchronous: str = "FULL") -> Ingest:
    """wrk against a fresh ``trackrelay serve``; the receiver's RSS is sampled meanwhile."""
    options = session.options
    database = session.databases.create(backend)
    # Postgres has no synchronous=NORMAL; its equivalent is not waiting for the WAL flush.
    env = {"PGOPTIONS": "-c synchronous_commit=off"} if backend == "postgres" and synchronous != "FULL" else None
    body_path = session.body_file(path.strip("/").replace("/", "-"), body)
    try:
        receiver, port = start_receiver(session.workdir, database, synchronous, env)
        with receiver:
            post_checked(port, path, body, AUTHORIZATION, WARM_UP)
            with RssSampler(receiver.pid) as rss:
                result = run_wrk(f"http://127.0.0.1:{port}{path}", body_path, options.duration,
                                 options.connections, AUTHORIZATION)
        committed = _committed(database)
        if committed < WARM_UP + result.requests - result.failed:
            raise BenchError(f"{committed} outbox rows committed for {result.requests - result.failed} "
                             f"answered requests")
        return Ingest(result, rss.peak_mb)
    finally:
        session.databases.drop(database)


def hello_run(session: Session, body: bytes) -> WrkResult:
    hello, port = start_hello(session.workdir)
    with hello:
        post_checked(port, "/v1/track", body, AUTHORIZATION, WARM_UP)
        return run_wrk(f"http://127.0.0.1:{port}/v1/track", session.body_file("v1-track", body),
                       session.options.duration, session.options.connections, AUTHORIZATION)


def _add(figure: Figure, value: WrkResult, ceiling: WrkResult | None = None, per_request: int = 1) -> None:
    figure.values.append(value.rate * per_request)
    if ceiling is not None:
        figure.ceilings.append(ceiling.rate * per_request)
    for result in (value, ceiling):
        if result is not None and result.failed:
            figure.note = "; ".join(filter(None, [figure.note, result.note()]))


def single_events(session: Session, backend: str, wanted: set[str]) -> list[Figure]:
    """R1 (vs hello-world) and R2 (FULL vs NORMAL) from the same interleaved runs."""
    body = track_body("r1")
    r1 = Figure(backend, "R1", "POST /v1/track, req/s (vs hello-world)", target=Target("ratio", 0.8))
    normal = "synchronous_commit=off" if backend == "postgres" else "synchronous=NORMAL"
    durable = "synchronous_commit=on" if backend == "postgres" else "synchronous=FULL"
    r2 = Figure(backend, "R2", f"R1 {durable}, req/s (vs {normal})", target=Target("ratio", 0.9))
    peaks = []
    for run in range(session.options.runs):
        full = receiver_run(session, backend, "/v1/track", body)
        peaks.append(full.peak_rss_mb)
        hello = hello_run(session, body) if "R1" in wanted else None
        _add(r1, full.wrk, hello)
        if "R2" in wanted:
            _add(r2, full.wrk, receiver_run(session, backend, "/v1/track", body, "NORMAL").wrk)
        session.say(f"{backend} R1 run {run + 1}: {full.wrk.rate:,.0f} req/s"
                    + (f", hello {hello.rate:,.0f}" if hello else "")
                    + (f", {normal} {r2.ceilings[-1]:,.0f}" if r2.ceilings else ""))
    session.facts[(backend, "R1")] = list(r1.values)
    session.facts[(backend, "receiver_rss")] = peaks
    if r1.ratio is not None:
        r1.note = "; ".join(filter(None, [f"stretch ratio >= 1.0: {'met' if r1.ratio >= 1 else 'not met'}", r1.note]))
    return [f for f in (r1, r2) if f.name in wanted]


def batches(session: Session, backend: str) -> list[Figure]:
    """R3: /v1/batch of 100 messages a request, events/s, vs raw inserts of one row per event."""
    body = batch_body("r3", 0)
    r3 = Figure(backend, "R3", "POST /v1/batch x100, events/s (vs raw inserts)", target=Target("ratio", 0.6))
    for run in range(session.options.runs):
        _add(r3, receiver_run(session, backend, "/v1/batch", body).wrk, per_request=100)
        database = session.databases.create(backend)
        try:
            r3.ceilings.append(session.raw("inserts", database, seconds=session.options.duration)["rate"])
        finally:
            session.databases.drop(database)
        session.say(f"{backend} R3 run {run + 1}: {r3.values[-1]:,.0f} events/s vs raw {r3.ceilings[-1]:,.0f}")
    session.facts[(backend, "R3")] = list(r3.values)
    return [r3]


def receiver_memory(session: Session, backend: str) -> list[Figure]:
    """R7's receiver half: peak RSS under the R1 load (the R1 runs' own samples when R1 ran)."""
    peaks = session.facts.get((backend, "receiver_rss"))
    if peaks is None:
        peaks = [receiver_run(session, backend, "/v1/track", track_body("r7")).peak_rss_mb
                 for _ in range(session.options.runs)]
    figure = Figure(backend, "R7", "receiver RSS under R1 load, MB", target=Target("max", 100, "MB"))
    figure.values = list(peaks)
    return [figure]
