"""``GET /metrics`` on the console's listener: the Prometheus text format, public (a scraper
needs no token).

Three parts: what every trackrelay process recorded (their multiprocess files: receiver
processes and the worker), the figures the database holds (computed at scrape time from
pipeline/operations.status(), the same figures as ``trackrelay status``, on the console's own
store), and the serving process's own process metrics. The whole exposition is built in a
thread: reading files and querying the database never runs on the event loop, which this
process shares with the tracking API.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.metrics import source_registry
from pipeline.operations import Status, status
from receiver.admin.access import AdminHandler
from receiver.admin.context import AdminContext

DELIVERY_STATES = ("pending", "in_flight", "retrying", "dead")


# The database's figures are read at most this often: a scraper asking every second (or two
# Prometheus replicas) would otherwise repeat the status queries, which take 5-10 ms at 25k
# rows waiting, on the process that also serves the tracking API.
DATABASE_FIGURES_SECONDS = 5.0


class DatabaseCollector(Collector):
    """The backlog as the database holds it, read at a scrape (at most every few seconds)."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self._figures: tuple[float, Status] | None = None
        self._lock = threading.Lock()  # scrapes are built on threads

    def figures(self) -> Status:
        with self._lock:
            now = time.monotonic()
            if self._figures is None or now - self._figures[0] >= DATABASE_FIGURES_SECONDS:
                self._figures = (now, status(self.ctx.store, self.ctx.config))
            return self._figures[1]

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        yield GaugeMetricFamily("trackrelay_outbox_pending", "Received requests not yet decoded",
                                value=figures.outbox_pending)
        deliveries = GaugeMetricFamily("trackrelay_deliveries", "Deliveries not finished, by destination and "
                                       "state (pending: never tried; in_flight: leased; retrying; dead)",
                                       labels=["destination", "state"])
        oldest = GaugeMetricFamily("trackrelay_oldest_pending_age_seconds", "Age of the oldest pending "
                                   "delivery (0: none pending)", labels=["destination"])
        limit = GaugeMetricFamily("trackrelay_concurrency_limit", "Requests in flight the workers' concurrency "
                                  "controllers now allow, summed over the workers", labels=["destination"])
        in_flight = GaugeMetricFamily("trackrelay_concurrency_in_flight", "Requests in flight to the destination, "
                                      "summed over the workers", labels=["destination"])
        rtt = GaugeMetricFamily("trackrelay_round_trip_seconds", "Mean round trip of the last window of "
                                "requests (the adaptive limit's measure)", labels=["destination"])
        for name, entry in sorted(figures.destinations.items()):
            for state in DELIVERY_STATES:
                deliveries.add_metric([name, state], getattr(entry, state))
            oldest.add_metric([name], entry.oldest_pending_age_seconds or 0.0)
            controller = entry.concurrency
            if controller is not None:
                limit.add_metric([name], controller.limit)
                in_flight.add_metric([name], controller.in_flight)
                if controller.rtt_ms is not None:
                    rtt.add_metric([name], controller.rtt_ms / 1000)
        yield from (deliveries, oldest, limit, in_flight, rtt)


def scrape_registry(ctx: AdminContext) -> CollectorRegistry:
    """Everything /metrics answers, in one registry."""
    registry = source_registry()
    registry.register(DatabaseCollector(ctx))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsHandler(AdminHandler):
    public = True

    def initialize(self, ctx: AdminContext, registry: CollectorRegistry, **_: Any) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.registry = registry

    async def get(self) -> None:
        body = await asyncio.to_thread(generate_latest, self.registry)
        # The classic text format (what generate_latest writes), which every Prometheus reads.
        self.set_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        self.finish(body)


def metrics_routes(ctx: AdminContext) -> list[tuple[str, type, dict[str, Any]]]:
    return [(r"/metrics", MetricsHandler, {"ctx": ctx, "registry": scrape_registry(ctx)})]
