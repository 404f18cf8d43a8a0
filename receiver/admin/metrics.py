"""``GET /metrics`` on the console's listener (being built: issue 13's metrics)."""

from __future__ import annotations

from typing import Any

from receiver.admin.context import AdminContext


def metrics_routes(ctx: AdminContext) -> list[tuple[str, type, dict[str, Any]]]:
    return []
