"""CORS for the browser SDKs, which post cross-origin; on every /v1 answer, errors included."""

from __future__ import annotations

from collections.abc import Collection

ALLOW_HEADERS = "Content-Type, Authorization, X-Retry-Count"
ALLOW_METHODS = "GET, POST, OPTIONS"
MAX_AGE = "86400"


def cors_headers(origin: str | None, allowed_origins: Collection[str]) -> dict[str, str]:
    """Headers for a request from ``origin``: ``*`` unless an allow-list is configured."""
    headers = {
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Max-Age": MAX_AGE,
    }
    if not allowed_origins:
        headers["Access-Control-Allow-Origin"] = "*"
        return headers
    # The answer depends on the Origin: caches must know, even when we refuse it.
    headers["Vary"] = "Origin"
    if origin and origin in allowed_origins:
        headers["Access-Control-Allow-Origin"] = origin
    return headers
