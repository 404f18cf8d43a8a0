"""First-party analytics.js: analytics-next's standalone bundle served from this receiver, at the
paths Segment's CDN uses, so the standard snippet works with only its host changed (ad
blockers and privacy tools drop third-party CDNs; a first-party path they leave alone).

``[receiver] browser_sdk_dir`` holds a copy of analytics-next's ``dist/umd`` folder (we do
not ship it). ``standalone.js`` is served at ``/analytics.js/v1/<writeKey>/analytics.min.js``
and the chunks it loads later at ``/analytics-next/bundles/<name>``, where the bundle looks for
them: ``<cdn>/analytics-next/bundles/``.

The bundle finds its CDN from its own ``<script src>``, but only when that is an ``https`` URL
(``parse-cdn.ts``); else it falls back to cdn.segment.com and, behind a firewall or a blocker,
never loads its settings. So the served script starts with one statement that sets the
snippet's ``analytics._cdn`` to this receiver's public origin when the page has not set it
itself (the variable Segment documents for self-hosting). Nothing else in it is changed.

Each file is read once (and again if its size or mtime changes), gzip-compressed once, and
answered with a strong ``ETag``; ``If-None-Match`` gets a ``304``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import orjson

STANDALONE = "standalone.js"
# Assets kept: one per file and public origin (the origin comes from Host unless public_url is
# set, and a client may send any Host: the oldest are dropped past this).
MAX_CACHED = 64
# The chunks analytics-next splits off: "<name>.bundle.<hash>.js" (and their source maps).
CHUNK_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.js(?:\.map)?")


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    content_type: str


def cdn_prologue(origin: str) -> bytes:
    """The statement put before the bundle: the snippet's ``_cdn``, unless the page set one."""
    quoted = orjson.dumps(origin).decode()
    return (
        "(function(){try{var s=document.currentScript,k=(s&&s.getAttribute('data-global-segment-analytics-key'))"
        f"||'analytics',a=window[k];if(a&&!a._cdn){{a._cdn={quoted};}}}}catch(e){{}}}})();\n"
    ).encode()


class BrowserBundle:
    """The files of one ``browser_sdk_dir``, read and compressed on first use."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self._cache: OrderedDict[tuple[str, str], tuple[tuple[int, int], Asset]] = OrderedDict()
        self._lock = threading.Lock()

    def standalone(self, origin: str) -> Asset | None:
        """analytics.min.js for a page that reaches us at ``origin``."""
        return self._asset(STANDALONE, origin)

    def chunk(self, name: str) -> Asset | None:
        if not CHUNK_NAME.fullmatch(name) or name == STANDALONE:
            return None
        return self._asset(name, "")

    def _asset(self, name: str, origin: str) -> Asset | None:
        path = self.directory / name
        try:
            stat = os.stat(path)
        except OSError:
            return None
        version = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get((name, origin))
            if cached is not None and cached[0] == version:
                return cached[1]
        try:
            content = path.read_bytes()
        except OSError:
            return None
        body = cdn_prologue(origin) + content if origin else content
        kind = "application/json; charset=utf-8" if name.endswith(".map") else "text/javascript; charset=utf-8"
        asset = Asset(body=body, gzipped=gzip.compress(body, 6, mtime=0),
                      etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"', content_type=kind)
        with self._lock:
            self._cache[name, origin] = (version, asset)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return asset
