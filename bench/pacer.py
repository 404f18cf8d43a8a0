"""An open-loop load generator: POST ``/v1/batch`` bodies at a fixed rate, whatever the server's pace.

wrk keeps a fixed number of requests in flight (closed loop): a slow server lowers the rate
it is offered. R9 must offer a set rate, so here a ticker issues a request every 1/RATE s
onto a queue that CONNECTIONS keep-alive connections take from; when all are busy the queue
grows, and ``late`` counts requests sent more than 100 ms after their time. Every request is
a batch of PER_REQUEST messages with messageIds of its own (the worker would drop repeated
ones as duplicates), built as it is sent. Prints one JSON
object: issued, answered (200), failed (other answers and errors), sent_rate (answered
requests per second over the run), late, and the times (``time.monotonic()``) it started and
stopped issuing.

    python -m bench.pacer --port 8088 --tag r9 --rate 150 --seconds 60 --authorization "Basic ..."
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
import orjson

from bench.messages import USER_AGENT, batch_body

TICK = 0.005
LATE = 0.1


@dataclass
class Count:
    issued: int = 0
    answered: int = 0
    failed: int = 0
    late: int = 0
    started: float = 0.0
    stopped: float = 0.0
    sent_rate: float = 0.0


def request_bytes(port: int, body: bytes, authorization: str) -> bytes:
    head = (f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if authorization:
        head += f"Authorization: {authorization}\r\n"
    return head.encode() + b"\r\n" + body


async def _answer_status(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one answer; (status, the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            keep = False
    await reader.readexactly(length)
    return status, keep


async def _connection(port: int, tag: str, authorization: str, per_request: int,
                      due: asyncio.Queue[tuple[int, float]], count: Count) -> None:
    reader = writer = None
    while True:
        number, when = await due.get()
        if time.monotonic() - when > LATE:
            count.late += 1
        data = request_bytes(port, batch_body(f"{tag}-{number}", 0, per_request), authorization)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            status, keep = await _answer_status(reader)  # type: ignore[arg-type]
        except (OSError, asyncio.IncompleteReadError, ValueError):
            count.failed += 1
            writer = None
            continue
        if status == 200:
            count.answered += 1
        else:
            count.failed += 1
        if not keep:
            writer.close()
            writer = None


async def pace(port: int, tag: str, authorization: str, rate: float, seconds: float, connections: int,
               per_request: int) -> Count:
    count = Count()
    due: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    senders = [asyncio.create_task(_connection(port, tag, authorization, per_request, due, count))
               for _ in range(connections)]
    count.started = start = time.monotonic()
    total = int(rate * seconds)
    while count.issued < total:
        now = time.monotonic()
        while count.issued < total and start + count.issued / rate <= now:
            due.put_nowait((count.issued, start + count.issued / rate))
            count.issued += 1
        await asyncio.sleep(TICK)
    count.stopped = time.monotonic()
    # The last requests get a moment to be answered; what is still queued then was never sent.
    deadline = time.monotonic() + 10
    while count.answered + count.failed < count.issued and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for sender in senders:
        sender.cancel()
    count.sent_rate = count.answered / max(count.stopped - count.started, 1e-9)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", required=True, help="messageIds are TAG-REQUEST-INDEX")
    parser.add_argument("--per-request", type=int, default=100, help="messages a request")
    parser.add_argument("--authorization", default="")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        count = runner.run(pace(args.port, args.tag, args.authorization, args.rate, args.seconds,
                                args.connections, args.per_request))
    sys.stdout.write(orjson.dumps(asdict(count)).decode() + "\n")


if __name__ == "__main__":
    main()
