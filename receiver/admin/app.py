"""The console's route table and its Tornado application."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tornado.web import Application, HTTPError

from receiver.admin.access import AdminHandler, SESSION_COOKIE, SESSION_HOURS, bearer_matches, session_secret
from receiver.admin.api import api_routes
from receiver.admin.context import AdminContext
from receiver.admin.live import LiveApi
from receiver.admin.metrics import metrics_routes
from receiver.admin.pages import page_routes

HERE = Path(__file__).parent


class HealthHandler(AdminHandler):
    """The console's own liveness (the tracking API's /health checks the store)."""

    public = True

    def get(self) -> None:
        # The pid says which process serves the console (one of --processes N).
        self.answer_json({"status": "ok", "pid": os.getpid()})


class LoginHandler(AdminHandler):
    public = True

    def get(self) -> None:
        if not self.token or self.current_user:
            self.redirect(safe_next(self.get_argument("next", "/")))
            return
        self.render("login.html", next=safe_next(self.get_argument("next", "/")), failed=False)

    def post(self) -> None:
        given = self.get_body_argument("token", "")
        target = safe_next(self.get_body_argument("next", "/"))
        if not self.token:
            self.redirect(target)
            return
        if not bearer_matches(f"Bearer {given}", self.token):
            self.set_status(401)
            self.render("login.html", next=target, failed=True)
            return
        self.set_signed_cookie(SESSION_COOKIE, "1", expires_days=None, httponly=True, samesite="Strict",
                               secure=self.request.protocol == "https", path="/")
        self.redirect(target, status=303)


class LogoutHandler(AdminHandler):
    def post(self) -> None:
        self.clear_cookie(SESSION_COOKIE, path="/")
        self.redirect("/login" if self.token else "/", status=303)


class NotFoundHandler(AdminHandler):
    def prepare(self) -> None:
        super().prepare()
        raise HTTPError(404, reason=f"no console route {self.request.path}")


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this listener only (never another site)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def routes(ctx: AdminContext) -> list[tuple[str, type, dict[str, Any]]]:
    args = {"ctx": ctx}
    table: list[tuple[str, type, dict[str, Any]]] = [
        (r"/health", HealthHandler, args),
        (r"/login", LoginHandler, args),
        (r"/logout", LogoutHandler, args),
    ]
    table += api_routes(args) + [(r"/api/live", LiveApi, args)] + page_routes(args)
    table += metrics_routes(ctx)
    return table


def make_admin_app(ctx: AdminContext) -> Application:
    token = ctx.config.admin.token
    return Application(
        routes(ctx),  # type: ignore[arg-type]
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        login_url="/login",
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Strict"},
        # Without a token nothing is signed that matters; a fixed key keeps Tornado content.
        cookie_secret=session_secret(token or "no token: loopback only"),
        max_age_days=SESSION_HOURS / 24,
        log_function=lambda handler: None,
        compress_response=True,
    )
