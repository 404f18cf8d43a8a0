"""R6: end-to-end latency, from a request's send to the event's arrival at the sink.

The receiver and the worker run as separate processes on the server CPU; the worker delivers
to the sink through a webhook destination with its default settings (batch_size 1). A
fixed-rate sender on the load CPU posts single events at half the sustained rate over
keep-alive connections, each with its own messageId, and records when it sent each; the sink
records when each messageId arrived. Both use CLOCK_MONOTONIC, one clock for the whole box.

The sustained rate is the whole pipeline's, measured in the same run just before: wrk posts
new events to the receiver as fast as it answers while the worker delivers them, and the
rate is what arrives at the sink meanwhile. (R1's rate is the receiver's alone: since the
receiver outran a worker that shares its CPU, half of it is no longer half the load the box
sustains, and the latency it gives is that of a backlog growing.)
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.load import UNIQUE_LUA, run_wrk
from bench.messages import AUTHORIZATION, USER_AGENT, track_body
from bench.processes import LOAD_CPUS, BenchError
from bench.report import Figure, Target
from bench.servers import Sink, start_receiver, start_worker
from bench.session import Session

# After the last send: a minute, and more for a backlog that delivers slowly (at 100/s).
ARRIVAL_SECONDS = 60.0


def _request(port: int, body: bytes) -> bytes:
    head = (f"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"User-Agent: {USER_AGENT}\r\nAuthorization: {AUTHORIZATION}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def send_at_rate(port: int, rate: float, seconds: float, connections: int, tag: str
                       ) -> tuple[dict[str, float], int, float]:
    """Post ``rate * seconds`` events on schedule; (send time by messageId, failures, achieved rate)."""
    total = int(rate * seconds)
    requests = [(f"{tag}-{i}", _request(port, track_body(tag, i))) for i in range(total)]
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
    sent: dict[str, float] = {}
    failures = 0

    async def connection() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (item := await queue.get()) is not None:
                message_id, request = item
                sent[message_id] = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if head[9:12] != b"200":
                    failures += 1
                    del sent[message_id]
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection()) for _ in range(connections)]
    start = time.monotonic()
    queued = 0
    while queued < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        for message in requests[queued:due]:
            queue.put_nowait(message)
        queued = due
        await asyncio.sleep(max(0.0, start + queued / rate - time.monotonic()))
    for _ in tasks:
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    return sent, failures, total / (time.monotonic() - start)


def _wait_arrivals(sink: Sink, expected: int) -> None:
    timeout = ARRIVAL_SECONDS + expected / 100
    deadline = time.monotonic() + timeout
    while sink.stats()["events"] < expected:
        if time.monotonic() > deadline:
            raise BenchError(f"the sink got {sink.stats()['events']} of {expected} events "
                             f"within {timeout:.0f} s of the last send")
        time.sleep(0.1)


def send_seconds(session: Session) -> float:
    return max(10.0, 2 * session.options.duration)


def sustained_rate(session: Session, backend: str, tag: str) -> float:
    """Events/s the receiver and worker sustain together: wrk posts new events (a counter in
    each messageId) for ``--duration`` seconds; the rate is what reached the sink meanwhile."""
    database = session.databases.create(backend)
    body = track_body(tag, 0).replace(f'"messageId":"{tag}-0"'.encode(), f'"messageId":"{tag}-@N@"'.encode())
    try:
        with Sink(session.workdir, cpus=LOAD_CPUS) as sink:
            hook = ({"name": "hook", "type": "webhook", "url": sink.url},)
            receiver, port = start_receiver(session.workdir, database, destinations=hook)
            with receiver:
                worker, _ = start_worker(session.workdir, database, hook)
                with worker:
                    run_wrk(f"http://127.0.0.1:{port}/v1/track", session.body_file(f"unique-{tag}", body),
                            session.options.duration, session.options.connections, AUTHORIZATION, UNIQUE_LUA)
                    stats, now = sink.stats(), time.monotonic()
    finally:
        session.databases.drop(database)
    if not stats["events"] or stats["first"] is None:
        raise BenchError("no event reached the sink while wrk ran")
    return stats["events"] / (now - stats["first"])


def one_run(session: Session, backend: str, rate: float, tag: str) -> tuple[list[float], float, str]:
    """Latencies in ms of one run, the rate achieved, and a note (failures, losses)."""
    seconds = send_seconds(session)
    database = session.databases.create(backend)
    try:
        with Sink(session.workdir, record=True, cpus=LOAD_CPUS) as sink:
            hook = ({"name": "hook", "type": "webhook", "url": sink.url},)
            receiver, port = start_receiver(session.workdir, database, destinations=hook)
            with receiver:
                worker, _ = start_worker(session.workdir, database, hook)
                with worker:
                    sent, failures, achieved = asyncio.run(
                        send_at_rate(port, rate, seconds, session.options.connections, tag))
                    _wait_arrivals(sink, len(sent))
                    arrivals = sink.arrivals()
    finally:
        session.databases.drop(database)
    latencies = [(arrivals[m] - t) * 1000 for m, t in sent.items() if m in arrivals]
    notes = []
    if failures:
        notes.append(f"{failures} refused")
    if len(latencies) < len(sent):
        notes.append(f"{len(sent) - len(latencies)} never arrived")
    return latencies, achieved, ", ".join(notes)


def end_to_end(session: Session, backend: str) -> list[Figure]:
    p50 = Figure(backend, "R6", "latency p50 at half the sustained rate, ms", target=Target("max", 50, "ms"))
    p99 = Figure(backend, "R6", "latency p99 at half the sustained rate, ms", target=Target("max", 500, "ms"))
    rates, sustained, notes = [], [], []
    for run in range(session.options.runs):
        sustained.append(sustained_rate(session, backend, f"r6s-{run}"))
        latencies, achieved, note = one_run(session, backend, sustained[-1] / 2, f"r6-{run}")
        quantiles = statistics.quantiles(latencies, n=100)
        p50.values.append(statistics.median(latencies))
        p99.values.append(quantiles[98])
        rates.append(f"{achieved:,.0f}")
        notes += [note] if note else []
        session.say(f"{backend} R6 run {run + 1}: sustained {sustained[-1]:,.0f} events/s; p50 {p50.values[-1]:.1f} ms, "
                    f"p99 {p99.values[-1]:.1f} ms at {achieved:,.0f} events/s {note}".rstrip())
    sent = (f"sent {'/'.join(rates)} events/s for {send_seconds(session):.0f} s "
            f"(sustained {'/'.join(f'{r:,.0f}' for r in sustained)})")
    r1 = session.facts.get((backend, "R1"))
    if r1 is not None:
        sent += f"; R1 alone {statistics.median(r1):,.0f} req/s"
    p50.note = p99.note = "; ".join([sent, *notes])
    return [p50, p99]
