"""CORS for the browser SDKs, which call us cross-origin: on every answer of the browser-facing
routes, errors included, and the preflights before them.

Which origins get an answer they may read:
- ``[receiver] cors_origins`` set: only those, whatever the source;
- else, once the source is known (the request's write key), that source's ``allowed_origins``
  (every origin when it lists none);
- else (a preflight, which never carries credentials, or an error before the key was read):
  any origin some source would take; every origin if some source lists none.
Without any list the answer is ``*``, the same for everyone, and says nothing of the Origin.
Otherwise the Origin is echoed and ``Vary: Origin`` tells caches the answer depends on it;
``Allow-Credentials`` only for an origin a list names (never with ``*``, never for an origin
echoed because some source takes every origin).

A preflight's ``Access-Control-Request-Headers`` are allowed as asked when they are valid header
names, rather than from a fixed list that the next SDK version outgrows (RudderStack's v3 asks
for ``anonymousid``, ``sentat`` and four ``rsa-*`` retry headers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from pipeline.config import Config, SourceConfig
from pipeline.origins import OriginPattern, origin_allowed

DEFAULT_ALLOW_HEADERS = "Content-Type, Authorization, X-Retry-Count"
ALLOW_METHODS = "GET, POST, OPTIONS"
MAX_AGE = "86400"
# The SDK must read Retry-After to honour a 429's or a 503's wait (it is not a CORS-safelisted
# response header).
EXPOSE_HEADERS = "Retry-After"

SHARED_HEADERS = {
    "Access-Control-Allow-Headers": DEFAULT_ALLOW_HEADERS,
    "Access-Control-Allow-Methods": ALLOW_METHODS,
    "Access-Control-Max-Age": MAX_AGE,
    "Access-Control-Expose-Headers": EXPOSE_HEADERS,
}
OPEN_HEADERS = MappingProxyType({**SHARED_HEADERS, "Access-Control-Allow-Origin": "*"})
# Scripts anyone may load (the bundle and its chunks): the same for every origin, so no Vary
# on them to keep caches and CDNs from storing them.
PUBLIC_ASSET_HEADERS = MappingProxyType({"Access-Control-Allow-Origin": "*"})

# A comma-separated list of header names (RFC 9110 tokens), as a preflight asks for them.
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
MAX_REQUESTED_HEADERS = 2048


class CorsPolicy:
    """The CORS headers of each answer, from the configured origin lists."""

    def __init__(self, config: Config) -> None:
        self.global_origins = frozenset(config.receiver.cors_origins)
        self.by_source = {source.name: source.allowed_origins for source in config.sources}
        self.any_unrestricted = config.open_mode or any(not s.allowed_origins for s in config.sources)
        self.union: tuple[OriginPattern, ...] = tuple(p for s in config.sources for p in s.allowed_origins)
        # With no list anywhere every answer is "*": nothing depends on the Origin.
        self.restricted = bool(self.global_origins) or bool(self.union)

    def allows(self, origin: str, sources: Sequence[str] | None = None) -> bool:
        """Whether ``origin`` may read answers for ``sources`` (None: not known yet)."""
        return self._decide(origin, sources)[0]

    def _decide(self, origin: str, sources: Sequence[str] | None) -> tuple[bool, bool]:
        """(allowed, and by an explicit list rather than for want of one)."""
        if self.global_origins:
            allowed = origin in self.global_origins
            return allowed, allowed
        if sources is None:
            if origin_allowed(origin, self.union):
                return True, True
            return self.any_unrestricted, False
        lists = [self.by_source.get(name) for name in sources]
        allowed = all(not patterns or origin_allowed(origin, patterns) for patterns in lists)
        return allowed, allowed and bool(lists) and all(lists)

    def source_allows(self, source: SourceConfig | None, origin: str) -> bool:
        """A source's own list (not the global one): may a request from ``origin`` use its key?"""
        return source is None or not source.allowed_origins or origin_allowed(origin, source.allowed_origins)

    def headers(self, origin: str | None, sources: Sequence[str] | None = None) -> Mapping[str, str]:
        """Headers for an answer to a request from ``origin`` carrying keys of ``sources``
        (not to be changed: without lists it is one shared mapping, on every answer)."""
        if not self.restricted:
            return OPEN_HEADERS
        # The answer depends on the Origin: caches must know, even when we refuse it.
        headers = {**SHARED_HEADERS, "Vary": "Origin"}
        allowed, explicit = self._decide(origin, sources) if origin else (False, False)
        if allowed:
            headers["Access-Control-Allow-Origin"] = origin or ""
            # Only for an origin a list names: echoing any origin with credentials would let
            # every site make credentialed calls here.
            if explicit:
                headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight_headers(self, origin: str | None, requested: str | None, private_network: bool,
                          sources: Sequence[str] | None = None) -> dict[str, str]:
        """Headers for an OPTIONS preflight: the origin rules above, the headers it asked for."""
        headers = dict(self.headers(origin, sources))
        allowed = allowed_request_headers(requested)
        if allowed is not None:
            headers["Access-Control-Allow-Headers"] = allowed
            headers["Vary"] = "Origin, Access-Control-Request-Headers" if self.restricted \
                else "Access-Control-Request-Headers"
        # Chrome asks before a public page may call a private address (Private Network Access).
        if private_network and "Access-Control-Allow-Origin" in headers:
            headers["Access-Control-Allow-Private-Network"] = "true"
        return headers


def allowed_request_headers(requested: str | None) -> str | None:
    """The preflight's requested header names, normalised, if they are a valid list; None for
    none or an invalid one (then the default list is answered)."""
    if not requested or len(requested) > MAX_REQUESTED_HEADERS:
        return None
    text = requested.strip()
    if not _HEADER_LIST.fullmatch(text):
        return None
    return ", ".join(name.strip() for name in text.split(","))
