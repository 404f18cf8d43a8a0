"""The HTTP side of the receiver: every route of the HTTP Tracking API and its aliases.

POSTs to the ingest paths are served by :mod:`receiver.ingest`'s own delegate; the Tornado
application below answers everything else on every path (preflights, wrong methods, pixels,
/health, unknown paths).
"""

from __future__ import annotations

from typing import Any

from tornado.web import Application

from pipeline.messages import MESSAGE_TYPES
from receiver.browser import BundleHandler, ChunkHandler, SettingsHandler, SourceConfigHandler
from receiver.bundle import BrowserBundle
from receiver.context import ReceiverContext
from receiver.handlers import HealthHandler, IngestPathHandler, MetricsHandler, NotFoundHandler
from receiver.ingest import IngestRouter, ingest_routes
from receiver.openapi import OpenApiHandler, openapi_document
from receiver.pixel import PixelHandler


def routes(ctx: ReceiverContext) -> list[tuple[str, type, dict[str, Any]]]:
    table: list[tuple[str, type, dict[str, Any]]] = [
        (path, IngestPathHandler, {"ctx": ctx}) for path in ingest_routes()]
    table += [(rf"/v1/pixel/{kind}", PixelHandler, {"ctx": ctx, "route_type": kind}) for kind in MESSAGE_TYPES]
    table += [
        (r"/v1/m", MetricsHandler, {"ctx": ctx}),
        (r"/health", HealthHandler, {"ctx": ctx}),
        (r"/openapi\.json", OpenApiHandler, {"ctx": ctx, "document": openapi_document()}),
        (r"/v1/projects/([^/]+)/settings/?", SettingsHandler, {"ctx": ctx}),
        (r"/sourceConfig/?", SourceConfigHandler, {"ctx": ctx}),
    ]
    sdk_dir = ctx.config.receiver.browser_sdk_dir
    bundle = {"ctx": ctx, "bundle": BrowserBundle(sdk_dir) if sdk_dir else None}
    table += [
        (r"/analytics\.js/v1/([^/]+)/analytics\.min\.js", BundleHandler, bundle),
        (r"/analytics-next/bundles/([^/]+)", ChunkHandler, bundle),
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


def make_router(ctx: ReceiverContext) -> IngestRouter:
    """What the HTTP server runs: the ingest delegate in front of the application."""
    return IngestRouter(make_app(ctx), ctx)
