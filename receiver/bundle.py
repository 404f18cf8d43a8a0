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
snippet's ``analytics._cdn`` (the variable Segment documents for self-hosting), unless the page
set it itself, to where the browser loaded this very script from: its ``src`` up to
``/analytics.js/v1/``. Worked out in the browser, so the file is the same for every host a
request names (nothing a client sends is written into it). Nothing else in it is changed.

Each file is read once (and again if its size or mtime changes), gzip-compressed once, and
answered with a strong ``ETag``; ``If-None-Match`` gets a ``304``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

STANDALONE = "standalone.js"
# The chunks analytics-next splits off: "<name>.bundle.<hash>.js" (and their source maps).
CHUNK_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.js(?:\.map)?")


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    content_type: str


# The statement put before the bundle (see above). currentScript is this script while it runs.
CDN_PROLOGUE = (
    b"(function(){try{var s=document.currentScript,m=s&&/^(.*)\\/analytics\\.js\\/v1\\//.exec(s.src),"
    b"a=window[(s&&s.getAttribute('data-global-segment-analytics-key'))||'analytics'];"
    b"if(m&&a&&!a._cdn){a._cdn=m[1];}}catch(e){}})();\n"
)


class BrowserBundle:
    """The files of one ``browser_sdk_dir``, read and compressed on first use."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        # By file name: the folder's files (a name that is no file there is never cached).
        self._cache: dict[str, tuple[tuple[int, int], Asset]] = {}
        self._lock = threading.Lock()

    def standalone(self) -> Asset | None:
        """analytics.min.js: the standalone bundle after the prologue."""
        return self._asset(STANDALONE, CDN_PROLOGUE)

    def chunk(self, name: str) -> Asset | None:
        if not CHUNK_NAME.fullmatch(name) or name == STANDALONE:
            return None
        return self._asset(name, b"")

    def _asset(self, name: str, prologue: bytes) -> Asset | None:
        path = self.directory / name
        try:
            stat = os.stat(path)
        except OSError:
            return None
        version = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == version:
                return cached[1]
        try:
            content = path.read_bytes()
        except OSError:
            return None
        body = prologue + content
        kind = "application/json; charset=utf-8" if name.endswith(".map") else "text/javascript; charset=utf-8"
        asset = Asset(body=body, gzipped=gzip.compress(body, 6, mtime=0),
                      etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"', content_type=kind)
        with self._lock:
            self._cache[name] = (version, asset)
        return asset
