"""How an HTTP answer, or a failure to get one, becomes an :class:`Outcome`.

2xx is delivered. 408, 429 and 5xx (except 501 and 505, which will not change by trying
again) are retried, honouring ``Retry-After``; timeouts and connection errors too. Every other
status is final: the destination refused the request and sending it again will not help.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from pipeline.destinations.base import DELIVERED, Outcome, rejected, retry

# A destination asking us to wait longer than this is capped: the retry policy's max age and
# attempts still apply, and an hour is already a long time to hold events back.
MAX_RETRY_AFTER_SECONDS = 3600.0
# How much of an error answer's body a reason keeps: enough to see why, never a flood.
BODY_EXCERPT_CHARS = 500
NOT_RETRYABLE_5XX = frozenset({501, 505})


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or (500 <= status <= 599 and status not in NOT_RETRYABLE_5XX)


def status_reason(status: int, body_text: str) -> str:
    excerpt = body_text[:BODY_EXCERPT_CHARS].strip()
    return f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), capped.

    None when the header is absent or unreadable; a date in the past means 0.
    """
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" or an obsolete zone: RFC 9110 dates are UTC
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    # Case-insensitive for any mapping (httpx and Tornado headers, or a plain dict).
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def outcome_for_status(status: int, headers: Mapping[str, str], body_text: str) -> Outcome:
    """The outcome of one HTTP answer, for every event the request carried."""
    if 200 <= status <= 299:
        return DELIVERED
    reason = status_reason(status, body_text)
    if is_retryable_status(status):
        return retry(reason, retry_after_seconds(header_value(headers, "Retry-After")))
    return rejected(reason)


def outcome_for_exception(exc: BaseException) -> Outcome:
    """The outcome when no answer came: a timeout or a connection error, retried."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return retry(f"timed out ({detail})")
    return retry(f"connection error ({detail})")
