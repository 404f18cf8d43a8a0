"""The bodies we answer with, in the spec's shapes plus ``code`` and ``message``.

Single routes answer ``{"Error", "Message", "Details"}``; batch routes
``{"Success": false, "Errors": [...]}``. Every error also carries top-level ``code`` and
``message``: rudder-sdk-python (and segment-analytics-python before 2.4) read them, and
without them treat a final 4xx as retryable and resend the same bad batch again and again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson

from pipeline.envelope import Verdict
from pipeline.messages import Problem

JSON = "application/json; charset=utf-8"
SUCCESS: dict[str, Any] = {"Success": True}
SUCCESS_BYTES = orjson.dumps(SUCCESS)


def retry_after(seconds: float) -> str:
    """The Retry-After value of a 503: whole seconds, rounded up."""
    return str(math.ceil(seconds))

STORE_UNAVAILABLE = Problem("store_unavailable", "Service unavailable",
                            "the event store cannot take writes now; retry later",
                            status=503, error="Service Unavailable")


# The database refused the request's row itself (a value it cannot hold), alone in its
# transaction: final, so that the client stops resending it. The database's words are in the
# log, not here (they may quote the row).
STORE_REFUSED = Problem("store_refused", "Request refused by the store",
                        "the database refused to store this request; resending it will not help")


def not_found(details: str) -> Problem:
    return Problem("not_found", "Not Found", details, status=404, error="Not Found")


def single_error(problem: Problem) -> dict[str, Any]:
    return {"Error": problem.error, "Message": problem.message, "Details": problem.details,
            "code": problem.code, "message": problem.message}


def _item(problem: Problem, index: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {"Error": problem.error, "Message": problem.message, "Details": problem.details}
    if index is not None:
        item["Index"] = index
    item["code"] = problem.code
    return item


def batch_error(problem: Problem) -> dict[str, Any]:
    """A batch route refusing the whole request (bad JSON, empty batch, too large)."""
    return {"Success": False, "Errors": [_item(problem, None)], "code": problem.code, "message": problem.message}


def batch_verdicts(verdicts: Sequence[Verdict]) -> tuple[dict[str, Any], Problem | None]:
    """The body listing every failed item, and a Problem summing them up (None if none failed).

    The summary's status is 413 when every item failed for size, otherwise 400; the caller
    decides between that and a partial success.
    """
    failed = [v for v in verdicts if v.problem is not None]
    if not failed:
        return dict(SUCCESS), None
    codes = {v.problem.code for v in failed if v.problem}
    first = failed[0].problem
    assert first is not None
    if len(failed) < len(verdicts):
        summary = Problem("partial_success", f"{len(failed)} of {len(verdicts)} messages were rejected",
                          status=207)
    elif len(codes) == 1:
        summary = Problem(first.code, first.message, first.details, status=first.status)
    else:
        summary = Problem("invalid_messages", f"all {len(verdicts)} messages were rejected")
    body = {"Success": False,
            "Errors": [_item(v.problem, v.index) for v in failed if v.problem is not None],
            "code": summary.code, "message": summary.message}
    return body, summary
