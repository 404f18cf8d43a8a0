"""Who may use the console, and how a browser's requests are kept from being forged.

- With ``[admin] token`` set, every route but ``/metrics`` and ``/health`` needs
  ``Authorization: Bearer <token>`` (compared in constant time) or the session cookie the login
  form sets: signed with a key derived from the token (a new token ends every session),
  HttpOnly, SameSite=Strict, and good for 12 hours.
- Without a token the listener is on a loopback address (pipeline/config.py refuses any other),
  and requests must name a loopback host in ``Host``: a page on another site that has its name
  resolve to 127.0.0.1 (DNS rebinding) is refused.
- State-changing requests from a browser carry a CSRF token (Tornado's ``xsrf_cookies``: the
  ``_xsrf`` form field or the ``X-XSRFToken`` header must match the ``_xsrf`` cookie). A bearer
  request needs none (no browser sends that header by itself), nor does a JSON body: a page on
  another origin cannot send ``Content-Type: application/json`` without a preflight, which
  this listener never grants.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson
from tornado.web import HTTPError, RequestHandler

from pipeline.config import is_loopback
from receiver.admin.context import AdminContext
from receiver.answers import JSON

SESSION_COOKIE = "trackrelay_session"
SESSION_HOURS = 12


def session_secret(token: str) -> str:
    """The key session cookies are signed with: from the token, so a changed token ends them."""
    return hmac.new(token.encode(), b"trackrelay admin session", hashlib.sha256).hexdigest()


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def host_is_loopback(host_header: str) -> bool:
    """Whether a ``Host`` header names this machine (``127.0.0.1:8089``, ``[::1]:8089``, ``localhost``)."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return bool(host) and is_loopback(host)


class AdminHandler(RequestHandler):
    """Every console route: checks access in ``prepare``; answers errors as JSON under /api/
    and as a small page elsewhere."""

    ctx: AdminContext
    public = False  # /metrics and /health: readable by a scraper without the token
    section = ""  # the dashboard section a page belongs to (its navigation link is marked)

    def initialize(self, ctx: AdminContext, **_: Any) -> None:
        self.ctx = ctx

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "no-referrer")
        # Every script and style is ours; nothing inline runs, nothing is fetched elsewhere.
        self.set_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(section=self.section, token_set=bool(self.token))
        return namespace

    @property
    def token(self) -> str:
        return self.ctx.config.admin.token

    def via_bearer(self) -> bool:
        return bool(self.token) and bearer_matches(self.request.headers.get("Authorization"), self.token)

    def get_current_user(self) -> str | None:
        if not self.token:
            return "operator"
        if self.via_bearer():
            return "bearer"
        cookie = self.get_signed_cookie(SESSION_COOKIE, max_age_days=SESSION_HOURS / 24)
        return "session" if cookie == b"1" else None

    def prepare(self) -> None:
        if not self.token and not host_is_loopback(self.request.host):
            raise HTTPError(403, reason="the console without a token answers only requests to a loopback host")
        if self.public or self.current_user:
            return
        if self.is_api():
            raise HTTPError(401, reason="needs Authorization: Bearer <token> (the [admin] token) or a login")
        if self.request.method in ("GET", "HEAD"):
            self.redirect(self.get_login_url() + "?" + _query(next=self.request.uri or "/"))
            return
        raise HTTPError(401, reason="log in first")

    def check_xsrf_cookie(self) -> None:
        if self.via_bearer() or _is_json(self.request.headers.get("Content-Type", "")):
            return
        super().check_xsrf_cookie()

    def is_api(self) -> bool:
        return self.request.path.startswith("/api/")

    def answer_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON)
        self.finish(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        if status_code == 401 and self.token:
            self.set_header("WWW-Authenticate", 'Bearer realm="trackrelay admin"')
        if self.is_api() or self.public:
            self.answer_json({"error": reason, "status": status_code}, status_code)
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.render("error.html", status=status_code, reason=reason)


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _query(**values: str) -> str:
    from urllib.parse import urlencode

    return urlencode(values)
