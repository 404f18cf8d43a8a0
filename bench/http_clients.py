"""Our HTTP client against aiohttp's, under the real webhook destination (issue 14, point 4).

Both sides drive the real ``WebhookDestination.deliver()`` (batch_size 1) from this process,
pinned to the load CPU: ours through :class:`HttpClient`, and :class:`AiohttpWebhook`, which
sends the same body and headers with one ``aiohttp.ClientSession`` (keep-alive pool of
``concurrency`` connections, C parser) from the same number of sender tasks. The sink is a
separate process on the other CPU, so the CPU figure is the client side's alone:

  R5      ``bench.sink`` (Tornado, R5's sink), answering every POST at once, 8 in flight
  R5-raw  the same against a bare asyncio sink that answers faster than either client sends,
          so that the client, not the sink, sets the rate
  R8      a Tornado sink answering every POST after 50 ms, 64 in flight

Runs alternate (ours, aiohttp, ours, ...) and each figure is the median of its runs: events/s
over the run, and CPU seconds (user + system, ``os.times``) of this process per 1,000
requests; the ratio is aiohttp's over ours.

    python -m bench.http_clients [--runs 3] [--duration 5]
    python -m bench.http_clients --serve PORT [--delay 0.05 | --raw]   (a sink, started by the above)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tornado.web import Application, RequestHandler

from bench.messages import delivered_event_body
from bench.processes import LOAD_CPUS, SERVER_CPUS, Process, cpu_list, free_port
from bench.servers import Sink
from bench.serving import serve_until_signalled
from pipeline.destinations.base import Event, Outcome, rejected
from pipeline.destinations.http import outcome_for_exception
from pipeline.destinations.httpclient import ClientClosed, ConnectError, ReadTimeout, Response
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions, user_agent
from pipeline.loop import run

SLOW_DELAY = 0.05
# The sink ("tornado": bench.sink, "slow": a Tornado sink with a delay, "raw": bare asyncio),
# its delay in seconds, and how many requests are in flight.
CONDITIONS = {"R5": ("tornado", 0.0, 8), "R5-raw": ("raw", 0.0, 8), "R8": ("slow", SLOW_DELAY, 64)}
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class AiohttpWebhook(WebhookDestination):
    """The webhook destination with aiohttp as its client: same requests, same concurrency
    (``concurrency`` sender tasks on one queue), a keep-alive pool of that many connections."""

    async def start(self) -> None:
        concurrency = self.options.concurrency
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.options.timeout_seconds),
            headers={"Content-Type": "application/json", "User-Agent": user_agent(), **self.client_headers()},
            skip_auto_headers=("Accept", "Accept-Encoding"))  # ours sends neither
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[Response]]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._post()) for _ in range(concurrency)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    async def _post(self) -> None:
        url = self.endpoint()
        while True:
            body, answer = await self._queue.get()
            try:
                async with self._session.post(url, data=body) as response:
                    content = await response.read()
                    answer.set_result(Response(response.status, {k.lower(): v for k, v in response.headers.items()},
                                               content))
            except asyncio.TimeoutError:
                answer.set_exception(ReadTimeout())
            except aiohttp.ClientError as exc:
                answer.set_exception(ConnectError(str(exc)))

    async def _send(self, chunk: Sequence[Event]) -> list[Outcome]:
        try:
            content, _ = await self.encode(chunk)
        except TypeError as exc:
            return [rejected(f"cannot encode as JSON: {exc}")] * len(chunk)
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((content, answer))
        try:
            response = await answer
        except (ConnectError, ReadTimeout, ClientClosed) as exc:
            return [outcome_for_exception(exc)] * len(chunk)
        return self.outcomes(chunk, response)


CLIENTS = {"ours": WebhookDestination, "aiohttp": AiohttpWebhook}


async def one_run(kind: str, url: str, concurrency: int, duration: float) -> tuple[float, float]:
    """(events/s, CPU seconds per 1,000 requests) of ``duration`` seconds of delivery."""
    destination = CLIENTS[kind]("hook", WebhookOptions(url=url, concurrency=concurrency), 1)
    event: Event = orjson.loads(delivered_event_body())
    delivered = 0
    await destination.start()
    try:
        await destination.deliver([event])  # the first connection is opened outside the figure

        async def caller(deadline: float) -> None:
            nonlocal delivered
            while time.monotonic() < deadline:
                [outcome] = await destination.deliver([event])
                if not outcome.delivered:
                    raise RuntimeError(f"{kind}: {outcome.reason}")
                delivered += 1

        before, started = os.times(), time.monotonic()
        # Twice the concurrency, as the worker's claim keeps the senders' queue from running dry.
        await asyncio.gather(*(caller(started + duration) for _ in range(2 * concurrency)))
        after, elapsed = os.times(), time.monotonic() - started
    finally:
        await destination.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    return delivered / elapsed, 1000 * cpu / delivered


class SlowSinkHandler(RequestHandler):
    def initialize(self, delay: float) -> None:
        self.delay = delay

    async def post(self, *_: Any) -> None:
        await asyncio.sleep(self.delay)


class RawSink(asyncio.Protocol):
    """Answers 200 to each request as soon as its body (by Content-Length) is in; no more HTTP
    than the two clients send, so it costs a fraction of what they do."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        answers = 0
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", buffer[:end])
            size = end + 4 + (int(length.group(1)) if length else 0)
            if len(buffer) < size:
                break
            del buffer[:size]
            answers += 1
        if answers:
            self.transport.write(ANSWER * answers)


async def serve(port: int, delay: float, raw: bool) -> None:
    if raw:
        server = await asyncio.get_running_loop().create_server(RawSink, "127.0.0.1", port)
        async with server:
            await server.serve_forever()
    app = Application([(r"/.*", SlowSinkHandler, {"delay": delay})], log_function=lambda _: None)
    await serve_until_signalled(app, port)


def sink_process(workdir: Path, kind: str, delay: float) -> tuple[Process, str]:
    if kind == "tornado":
        sink = Sink(workdir, cpus=SERVER_CPUS)
        return sink.process, sink.url
    port = free_port()
    options = ["--raw"] if kind == "raw" else ["--delay", str(delay)]
    process = Process(f"{kind} sink", [sys.executable, "-m", "bench.http_clients", "--serve", str(port), *options],
                      workdir / f"{kind}-sink-{port}.log", SERVER_CPUS)
    process.wait_port(port)
    return process, f"http://127.0.0.1:{port}/in"


def measure(condition: str, runs: int, duration: float, workdir: Path) -> dict[str, list[tuple[float, float]]]:
    sink, delay, concurrency = CONDITIONS[condition]
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in CLIENTS}
    for run_index in range(runs):
        for kind in CLIENTS:  # alternating, each run against a fresh sink
            process, url = sink_process(workdir, sink, delay)
            with process:
                rate, cpu = run(one_run(kind, url, concurrency, duration))
            results[kind].append((rate, cpu))
            print(f"{condition} run {run_index + 1} {kind:8s} {rate:8,.0f} events/s  {cpu:.3f} CPU s/1k requests",
                  flush=True)
    return results


def summary(condition: str, results: dict[str, list[tuple[float, float]]]) -> str:
    rate = {kind: statistics.median(r for r, _ in values) for kind, values in results.items()}
    cpu = {kind: statistics.median(c for _, c in values) for kind, values in results.items()}
    sink, delay, concurrency = CONDITIONS[condition]
    return (f"{condition} ({sink} sink, delay {delay * 1000:.0f} ms, {concurrency} in flight): "
            f"ours {rate['ours']:,.0f} events/s, {cpu['ours']:.3f} CPU s/1k; "
            f"aiohttp {rate['aiohttp']:,.0f} events/s, {cpu['aiohttp']:.3f} CPU s/1k; "
            f"aiohttp/ours rate {rate['aiohttp'] / rate['ours']:.2f}, CPU {cpu['aiohttp'] / cpu['ours']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=SLOW_DELAY, help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run(serve(args.serve, args.delay, args.raw))
        return
    os.sched_setaffinity(0, LOAD_CPUS)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"aiohttp {aiohttp.__version__}; client on CPU {cpu_list(LOAD_CPUS)}, sink on CPU {cpu_list(SERVER_CPUS)}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="http-clients-") as workdir:
        summaries = [summary(c, measure(c, args.runs, args.duration, Path(workdir))) for c in args.conditions]
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
