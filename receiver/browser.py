"""The routes browser SDKs load before they send: analytics-next's settings, RudderStack's source
config, and the first-party analytics.js bundle (see receiver/sdk_settings.py and
receiver/bundle.py for what each answers and why)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import orjson

from pipeline.messages import Problem
from receiver.answers import not_found, single_error
from receiver.auth import basic_auth_username
from receiver.bundle import Asset, BrowserBundle
from receiver.context import ReceiverContext
from receiver.cors import PUBLIC_ASSET_HEADERS
from receiver.handlers import ApiHandler, redacted_path
from receiver.sdk_settings import (BadHost, analytics_next_settings, public_base, rudderstack_source_config,
                                   varies_with)

SETTINGS_PATH = re.compile(r"/v1/projects/([^/]+)/settings/?")
# Settings change when the configuration does (a restart): browsers and proxies may keep them
# a while, as Segment's CDN lets them.
SETTINGS_CACHE = "public, max-age=300"
BUNDLE_CACHE = "public, max-age=300"
CHUNK_CACHE = "public, max-age=31536000, immutable"  # the name carries the content's hash

UNKNOWN_KEY = not_found("no source has this write key")
NOT_SERVED = not_found("analytics.js is not served here: set [receiver] browser_sdk_dir")
_UNSET: Any = object()


class SourceLookup(ApiHandler):
    """A handler whose answer is for one write key's source."""

    _source: str | None = _UNSET

    def source(self) -> str | None:
        """The source of the request's write key, None if none; looked up once a request (the
        CORS headers need it before the answer does, and each lookup compares every key)."""
        if self._source is _UNSET:
            key = self.write_key()
            self._source = self.ctx.sources.source_for(key) if key else None
        return self._source

    def cors_sources(self) -> list[str] | None:
        source = self.source()
        return [source] if source is not None else None

    def write_key(self) -> str | None:
        raise NotImplementedError

    def answer_json(self, body: dict[str, Any], cache: str) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", cache)
        self.finish(orjson.dumps(body))

    def base_or_400(self) -> tuple[str, str] | None:
        try:
            return public_base(self.request, self.ctx.config.receiver)
        except BadHost as exc:
            self.answer(400, single_error(Problem("invalid_host", "Invalid Host", str(exc))))
            return None


class SettingsHandler(SourceLookup):
    """``GET /v1/projects/<writeKey>/settings``: analytics-next's source settings."""

    def write_key(self) -> str | None:
        match = SETTINGS_PATH.fullmatch(self.request.path)
        return unquote(match.group(1)) if match else None

    def get(self, key: str) -> None:
        if self.source() is None:
            return self.answer(404, single_error(UNKNOWN_KEY))
        base = self.base_or_400()
        if base is not None:
            vary = varies_with(self.ctx.config.receiver)
            if vary:
                self.add_header("Vary", vary)
            self.answer_json(analytics_next_settings(key, *base), SETTINGS_CACHE)


class SourceConfigHandler(SourceLookup):
    """``GET /sourceConfig/?writeKey=...`` (and HEAD, which the SDK sends to detect ad
    blockers): RudderStack's source config. The key comes from the query or Basic auth."""

    def write_key(self) -> str | None:
        # Read by hand, not with get_query_argument: this runs while the handler is built (for
        # its CORS headers), where an HTTPError for a key that is not UTF-8 would drop the
        # connection unanswered. Such a key is no source's: a 404.
        values = self.request.query_arguments.get("writeKey")
        key = values[-1].decode("utf-8", "replace") if values else None
        return key or basic_auth_username(self.request.headers.get("Authorization"))

    def get(self) -> None:
        source = self.source()
        if source is None:
            return self.answer(404, single_error(UNKNOWN_KEY))
        self.answer_json(rudderstack_source_config(source), SETTINGS_CACHE)

    def head(self) -> None:
        found = self.source() is not None
        if found:
            self.set_header("Cache-Control", SETTINGS_CACHE)
        self.set_status(200 if found else 404)
        self.finish()


class BundleHandler(SourceLookup):
    """``/analytics.js/v1/<writeKey>/analytics.min.js``: the standalone bundle."""

    def set_default_headers(self) -> None:
        # Public scripts: the same CORS answer for every origin (receiver/cors.py).
        for name, value in PUBLIC_ASSET_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", "no-store")

    def initialize(self, ctx: ReceiverContext, bundle: BrowserBundle | None = None, **_: Any) -> None:
        super().initialize(ctx)
        self.bundle = bundle

    def write_key(self) -> str | None:
        parts = self.request.path.split("/")
        return unquote(parts[3]) if len(parts) > 3 else None

    def not_served(self) -> bool:
        if self.bundle is not None:
            return False
        self.answer(404, single_error(NOT_SERVED))
        return True

    def get(self, key: str) -> None:
        if self.not_served():
            return
        if self.source() is None:
            return self.answer(404, single_error(UNKNOWN_KEY))
        assert self.bundle is not None
        self.send_asset(self.bundle.standalone(), BUNDLE_CACHE)

    head = get  # Tornado answers HEAD without the body

    def send_asset(self, asset: Asset | None, cache: str) -> None:
        if asset is None:
            return self.answer(404, single_error(not_found(f"no file {redacted_path(self.request.path)}")))
        self.set_header("Cache-Control", cache)
        self.set_header("ETag", asset.etag)
        self.set_header("Content-Type", asset.content_type)
        self.add_header("Vary", "Accept-Encoding")
        if self.check_etag_header():  # Tornado's: weak comparison, "*", several tags
            self.set_status(304)
            return self.finish()
        if accepts_gzip(self.request.headers.get("Accept-Encoding")):
            self.set_header("Content-Encoding", "gzip")
            return self.finish(asset.gzipped)
        self.finish(asset.body)

    def compute_etag(self) -> str | None:
        return None  # ours is set above; Tornado's own would hash every answer again


class ChunkHandler(BundleHandler):
    """``/analytics-next/bundles/<name>``: the chunks the bundle loads as it needs them."""

    def write_key(self) -> str | None:
        return None

    def get(self, name: str) -> None:  # type: ignore[override]
        if not self.not_served():
            assert self.bundle is not None
            self.send_asset(self.bundle.chunk(name), CHUNK_CACHE)

    head = get


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` takes gzip (``gzip;q=0`` refuses it)."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            quality = params.strip().lower().removeprefix("q=")
            try:
                return not params.strip() or float(quality) > 0
            except ValueError:
                return True
    return False
