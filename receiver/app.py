"""The Tornado application: every route of the HTTP Tracking API and its aliases."""

from __future__ import annotations

from typing import Any

from tornado.web import Application

from pipeline.envelope import BATCH, SINGLE, WEBHOOK
from pipeline.messages import MESSAGE_TYPES
from receiver.context import ReceiverContext
from receiver.handlers import HealthHandler, IngestHandler, MetricsHandler, NotFoundHandler
from receiver.pixel import PixelHandler

# Single-message routes and their one-letter aliases.
SHORT = {"identify": "i", "track": "t", "page": "p", "screen": "s", "group": "g", "alias": "a"}


def routes(ctx: ReceiverContext) -> list[tuple[str, type, dict[str, Any]]]:
    table: list[tuple[str, type, dict[str, Any]]] = []
    for kind in MESSAGE_TYPES:
        args = {"ctx": ctx, "route": kind, "kind": SINGLE, "route_type": kind}
        table.append((rf"/v1/(?:{kind}|{SHORT[kind]})", IngestHandler, args))
        table.append((rf"/v1/pixel/{kind}", PixelHandler, {"ctx": ctx, "route_type": kind}))
    table += [
        (r"/v1/(?:batch|import|b)", IngestHandler, {"ctx": ctx, "route": "batch", "kind": BATCH}),
        (r"/v1/(?:webhook|w)", IngestHandler, {"ctx": ctx, "route": "webhook", "kind": WEBHOOK}),
        (r"/v1/m", MetricsHandler, {"ctx": ctx}),
        (r"/health", HealthHandler, {"ctx": ctx}),
    ]
    return table


def make_app(ctx: ReceiverContext) -> Application:
    return Application(
        routes(ctx),  # type: ignore[arg-type]
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        # Per-request access lines cost throughput at thousands of requests a second; errors
        # are logged by the handlers themselves.
        log_function=lambda handler: None,
        compress_response=False,
    )
