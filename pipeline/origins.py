"""Browser origins as a source's ``allowed_origins`` lists them, and matching a request's
``Origin`` header against them.

A pattern is an origin as browsers send it (``scheme://host[:port]``, lower case, no path), or
one whose host starts with ``*.`` to stand for any subdomain (``https://*.example.com``
matches ``https://shop.example.com`` and ``https://a.b.example.com``, not
``https://example.com``), or ``null`` for the opaque origin of ``file:`` pages and sandboxed
frames. Parsed once at start-up (config), matched per request (receiver).
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

# scheme://host[:port], host a name or an IPv4 address or a bracketed IPv6 address.
_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<wild>\*\.)?(?P<host>\[[0-9a-f:.]+\]|[a-z0-9_.-]+)"
                     r"(?::(?P<port>[0-9]{1,5}))?")
DEFAULT_PORTS = {"http": "80", "https": "443"}


class OriginPattern(NamedTuple):
    scheme: str
    host: str  # without the "*." of a wildcard
    port: str  # "" for the scheme's default
    wildcard: bool

    def matches(self, origin: str) -> bool:
        parsed = parse_origin(origin)
        if parsed is None:
            return self.scheme == "" and origin == "null"
        scheme, host, port = parsed
        if scheme != self.scheme or port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def _host(text: str) -> str | None:
    """A host as compared: an IPv6 address in its one compressed spelling; None if invalid."""
    if not text.startswith("["):
        return text
    try:
        return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]"
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    if host.startswith("["):
        return True
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def parse_origin(origin: str) -> tuple[str, str, str] | None:
    """``(scheme, host, port)`` of a serialised origin, the default port as ""; None for
    ``null`` or anything that is not an origin."""
    match = _ORIGIN.fullmatch(origin.lower()) if len(origin) <= 300 else None
    if match is None or match["wild"]:
        return None
    host = _host(match["host"])
    if host is None:
        return None
    port = match["port"] or ""
    return match["scheme"], host, "" if DEFAULT_PORTS.get(match["scheme"]) == port else port


def parse_pattern(text: str) -> OriginPattern:
    """Raise ValueError (saying what is wrong) unless ``text`` is an origin pattern."""
    if text == "null":
        return OriginPattern("", "null", "", False)
    match = _ORIGIN.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not an origin: scheme://host[:port], no path "
                         "(a leading '*.' in the host allows its subdomains)")
    port = match["port"] or ""
    if port and not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    host = _host(match["host"])
    if host is None:
        raise ValueError(f"{text!r}: not an IPv6 address")
    wildcard = bool(match["wild"])
    # "*.com" would take every site of a top-level domain, "*.0.0.1" an address's neighbours.
    if wildcard and ("." not in host.strip(".") or _is_ip(host) or host.rsplit(".", 1)[-1].isdigit()):
        raise ValueError(f"{text!r}: a wildcard needs a domain of at least two labels under it (https://*.shop.example)")
    scheme = match["scheme"]
    return OriginPattern(scheme, host, "" if DEFAULT_PORTS.get(scheme) == port else port, wildcard)


def origin_allowed(origin: str, patterns: tuple[OriginPattern, ...]) -> bool:
    return any(pattern.matches(origin) for pattern in patterns)
