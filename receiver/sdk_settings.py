"""What the browser SDKs fetch before they send anything, pointing them back at us.

- analytics-next (``AnalyticsBrowser.load({writeKey, cdnURL})``, or the snippet) reads
  ``GET <cdn>/v1/projects/<writeKey>/settings``: where to send (``integrations["Segment.io"]``'s
  ``apiHost`` and ``protocol``), which device-mode destinations to load (none: every other key
  of ``integrations``), and the optional features it looks for (tracking plan, edge function,
  middleware, remote plugins, consent, its own metrics: all off).
- RudderStack's JavaScript SDK v3 reads ``GET <configUrl>/sourceConfig/?writeKey=...``: a
  ``source`` with an ``id``, a ``config`` and a ``destinations`` array (empty: no device-mode
  destinations), and ``enabled``; its error and metrics reporting to RudderStack stay off.

Both come from reading the SDKs' sources (analytics-next 1.84 ``browser/settings.ts`` and
``browser/index.ts``; rudder-sdk-js 3.x ``ConfigManager.processConfig`` and
``isValidSourceConfig``): what they read, nothing more, with the defaults they would assume.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from tornado.httputil import HTTPServerRequest

from pipeline.config import ReceiverConfig

# A host (name, IPv4 or [IPv6]) with an optional port: all a Host header may carry that we
# would write back into settings and scripts.
_HOST = re.compile(r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class BadHost(ValueError):
    """The request names no usable host, so there is no public address to answer with."""


def public_base(request: HTTPServerRequest, receiver: ReceiverConfig) -> tuple[str, str]:
    """``(scheme, host[:port][/prefix])`` at which browsers reach this receiver.

    ``[receiver] public_url`` when set; else the request's own ``Host`` (``X-Forwarded-Host``
    and ``X-Forwarded-Proto`` only when ``trust_forwarded_headers``, as Tornado's ``xheaders``
    already applies the latter to ``request.protocol``).
    """
    if receiver.public_url:
        parts = urlsplit(receiver.public_url)
        return parts.scheme, parts.netloc + parts.path.rstrip("/")
    host = request.headers.get("Host", "")
    if receiver.trust_forwarded_headers:
        # The last value: the one our proxy added (a client may send its own before it), as
        # Tornado takes X-Forwarded-For and X-Forwarded-Proto.
        host = request.headers.get("X-Forwarded-Host", host).split(",")[-1].strip()
    if not _HOST.fullmatch(host):
        raise BadHost(f"cannot tell the public address from Host {host[:100]!r}: set [receiver] public_url")
    scheme = request.protocol if request.protocol in ("http", "https") else "http"
    return scheme, host


def varies_with(receiver: ReceiverConfig) -> str | None:
    """The request headers an answer built from :func:`public_base` depends on (for ``Vary``,
    so that no cache hands one Host's answer to another); None with ``public_url``."""
    if receiver.public_url:
        return None
    return "Host, X-Forwarded-Host, X-Forwarded-Proto" if receiver.trust_forwarded_headers else "Host"


def analytics_next_settings(write_key: str, scheme: str, base: str) -> dict[str, Any]:
    """The source settings analytics-next loads from its CDN, for this receiver."""
    return {
        "integrations": {
            "Segment.io": {
                # The one place a key is answered: analytics-next sends it as every event's
                # writeKey from here (plugins/segmentio/normalize.ts), and the caller named it.
                "apiKey": write_key,
                "apiHost": f"{base}/v1",
                "protocol": scheme,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"componentTypes": []},
            },
        },
        "plan": {"track": {"__default": {"enabled": True, "integrations": {}}},
                 "identify": {"__default": {"enabled": True}},
                 "group": {"__default": {"enabled": True}}},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        # Its own error metrics go to Segment unless sampled at 0; pointed here if turned on.
        "metrics": {"sampleRate": 0, "host": f"{base}/v1"},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
        "consentSettings": {"allCategories": [], "hasUnmappedDestinations": False},
        "autoInstrumentationSettings": {"sampleRate": 0},
    }


def rudderstack_source_config(source: str) -> dict[str, Any]:
    """The ``/sourceConfig`` answer RudderStack's SDK loads, for ``source``. (Not the key: the SDK
    does not read it back, and a key goes nowhere it is not needed.)"""
    return {
        "isHosted": False,
        "source": {
            "id": source,
            "name": source,
            "workspaceId": "trackrelay",
            "enabled": True,
            "config": {"statsCollection": {"errors": {"enabled": False}, "metrics": {"enabled": False}}},
            "destinations": [],
        },
    }
