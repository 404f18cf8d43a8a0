"""The HTTP side of the receiver: every route of the HTTP Tracking API and its aliases.

POSTs to the ingest paths are served by :mod:`receiver.ingest`'s own delegate; the Tornado
application below answers everything else on every path (preflights, wrong methods, pixels,
/health, unknown paths).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tornado.web import Application, RequestHandler

from pipeline.messages import MESSAGE_TYPES
from receiver.browser import BundleHandler, ChunkHandler, SettingsHandler, SourceConfigHandler
from receiver.bundle import BrowserBundle
from receiver.context import ReceiverContext
from receiver.counts import UNKNOWN_ROUTE
from receiver.handlers import HealthHandler, IngestPathHandler, MetricsHandler, NotFoundHandler
from receiver.ingest import IngestRoute, IngestRouter, ingest_routes
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


# The route label of each handler's answers (trackrelay_http_requests_total): names, never paths.
ROUTE_NAMES: dict[type, str] = {MetricsHandler: "m", HealthHandler: "health", OpenApiHandler: "openapi",
                                SettingsHandler: "settings", SourceConfigHandler: "sourceConfig",
                                BundleHandler: "bundle", ChunkHandler: "chunk"}


def route_name(handler: RequestHandler, ingest: dict[str, IngestRoute]) -> str:
    """The bounded route label of a request the application answered."""
    if isinstance(handler, PixelHandler):
        return handler.route
    if isinstance(handler, IngestPathHandler):  # a preflight or wrong method on an ingest path
        known = ingest.get(handler.request.path)
        return known.route if known is not None else UNKNOWN_ROUTE
    return ROUTE_NAMES.get(type(handler), UNKNOWN_ROUTE)


def count_answer(ctx: ReceiverContext) -> Callable[[RequestHandler], None]:
    """Tornado's per-request log hook, used to count answers (no access lines: see below)."""
    ingest = ingest_routes()

    def counted(handler: RequestHandler) -> None:
        ctx.counts.answered(route_name(handler, ingest), handler.get_status(), handler.request.request_time())

    return counted


def make_app(ctx: ReceiverContext) -> Application:
    return Application(
        routes(ctx),  # type: ignore[arg-type]
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        # Per-request access lines cost throughput at thousands of requests a second; errors
        # are logged by the handlers themselves.
        log_function=count_answer(ctx),
        compress_response=False,
    )


def make_router(ctx: ReceiverContext) -> IngestRouter:
    """What the HTTP server runs: the ingest delegate in front of the application."""
    return IngestRouter(make_app(ctx), ctx)
