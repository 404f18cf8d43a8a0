"""Committing what a request brought: the outbox row for what we accept, the rejected row for
what we refuse. Shared by the ingest routes and the pixels."""

from __future__ import annotations

import logging
from typing import Any

from tornado.httputil import HTTPServerRequest

from pipeline.messages import Problem
from pipeline.store import RowRefused, StoreUnavailable, now_ms
from receiver.context import ReceiverContext

log = logging.getLogger("trackrelay.receiver")


def request_facts(request: HTTPServerRequest, route: str) -> dict[str, Any]:
    return {"received_at_ms": now_ms(), "route": route, "remote_addr": request.remote_ip}


async def record_rejected(ctx: ReceiverContext, request: HTTPServerRequest, route: str, problem: Problem,
                          raw: bytes | None, source: str | None = None) -> None:
    """Keep what we refused where an operator can see it; a failure here changes no answer."""
    ctx.counts.refused(problem.code)
    limit = ctx.config.receiver.rejected_raw_bytes
    reason = f"{problem.message}: {problem.details}" if problem.details else problem.message
    row = {**request_facts(request, route), "source": source, "status": problem.status, "code": problem.code,
           "reason": reason.replace("\x00", ""), "raw": raw[:limit] if raw is not None else None}
    try:
        await ctx.committer.commit("rejected", row)
    except (StoreUnavailable, RowRefused) as exc:
        ctx.throttled.warning("rejected_not_recorded", "event=rejected_not_recorded code=%s error=%r", problem.code,
                          str(exc))


async def commit_request(ctx: ReceiverContext, request: HTTPServerRequest, route: str, body: bytes, source: str,
                         auth_key: str | None, override_key: str | None = None) -> None:
    """Return once the request is committed to the outbox; raise StoreUnavailable (logged) if
    the store cannot take it, which the caller answers with a 503, or RowRefused if the database
    refuses this row itself, which the caller answers with :data:`STORE_REFUSED`."""
    user_agent = request.headers.get("User-Agent")
    row = {**request_facts(request, route), "source": source, "body": body,
           "user_agent": user_agent[:512].replace("\x00", "") if user_agent else None,
           # Postgres text cannot hold NUL; a Basic username may carry one (open mode keeps it).
           "auth_key": auth_key.replace("\x00", "") if auth_key else None, "override_key": override_key}
    try:
        await ctx.committer.commit("outbox", row)
    except StoreUnavailable as exc:
        ctx.throttled.warning("store_unavailable", "event=store_unavailable route=%s error=%r", route, str(exc))
        raise
