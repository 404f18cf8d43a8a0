"""HTTP answers and failures to outcomes: the classification every HTTP adapter shares."""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
import pytest

from pipeline.destinations.base import DELIVERED, rejected, retry
from pipeline.destinations.http import outcome_for_exception, outcome_for_status, retry_after_seconds

NOW = datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 207, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert outcome_for_status(status, {}, "whatever") == DELIVERED


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 507, 599])
def test_408_429_and_5xx_are_retried(status: int) -> None:
    assert outcome_for_status(status, {}, "try later") == retry(f"HTTP {status}: try later")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 501, 505, 301])
def test_other_statuses_are_rejected_with_the_body(status: int) -> None:
    assert outcome_for_status(status, {}, "no such thing") == rejected(f"HTTP {status}: no such thing")


def test_a_rejection_keeps_the_first_500_characters_of_the_body() -> None:
    assert outcome_for_status(400, {}, "é" * 600 + "tail") == rejected("HTTP 400: " + "é" * 500)


def test_an_empty_body_gives_the_bare_status() -> None:
    assert outcome_for_status(404, {}, "") == rejected("HTTP 404")


def test_retry_after_in_seconds_is_honoured_whatever_the_header_case() -> None:
    assert outcome_for_status(503, {"retry-after": "7"}, "") == retry("HTTP 503", 7.0)
    assert outcome_for_status(429, httpx.Headers({"Retry-After": "2"}), "") == retry("HTTP 429", 2.0)


def test_retry_after_is_ignored_on_a_rejection() -> None:
    assert outcome_for_status(400, {"Retry-After": "7"}, "") == rejected("HTTP 400")


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    assert retry_after_seconds("Thu, 26 Nov 2026 10:01:30 GMT", NOW) == 90.0


def test_retry_after_in_the_past_means_now() -> None:
    assert retry_after_seconds("Thu, 26 Nov 2026 09:00:00 GMT", NOW) == 0.0
    assert retry_after_seconds("-5", NOW) == 0.0


def test_retry_after_is_capped_at_an_hour() -> None:
    assert retry_after_seconds("86400", NOW) == 3600.0
    assert retry_after_seconds("Fri, 27 Nov 2026 10:00:00 GMT", NOW) == 3600.0


@pytest.mark.parametrize("value", [None, "", "  ", "soon", "NaN", "Thu, 99 Nov 2026"])
def test_an_unreadable_retry_after_is_no_hint(value: str | None) -> None:
    assert retry_after_seconds(value, NOW) is None


def test_a_timeout_is_retried() -> None:
    assert outcome_for_exception(httpx.ReadTimeout("read timed out")) == retry("timed out (ReadTimeout: read timed out)")


def test_a_connection_error_is_retried() -> None:
    assert outcome_for_exception(httpx.ConnectError("refused")) == retry("connection error (ConnectError: refused)")
