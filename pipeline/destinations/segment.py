"""The ``segment`` destination: forward events to any Segment-compatible ``/v1/batch``.

Segment itself, RudderStack, or another trackrelay. A batch answered 2xx may still list
failed items (``"Errors": [{"Index": i, "Message": ...}]``, what trackrelay answers with 207,
or 200 when so configured): exactly those are rejected and the rest delivered, so a chain of
relays never loses an event without saying so.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from pipeline.destinations.base import DELIVERED, Event, Outcome, rejected, retry
from pipeline.destinations.concurrency import ADAPTIVE, DEFAULT_MAX_CONCURRENCY
from pipeline.destinations.http import BODY_EXCERPT_CHARS, outcome_for_status
from pipeline.destinations.httpclient import Response
from pipeline.destinations.webhook import WebhookDestination
from pipeline.normalise import iso_ms

log = logging.getLogger("trackrelay.destinations.segment")


@dataclass(frozen=True)
class SegmentOptions:
    url: str
    write_key: str
    timeout_seconds: float = 10.0
    # As the webhook's: "adaptive" (Segment answers 429 when it wants less) or a fixed number.
    concurrency: int | str = ADAPTIVE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    gzip: bool = False


def item_errors(content: bytes, count: int) -> tuple[dict[int, str], bool]:
    """The failed items a Segment-style answer lists by ``Index``, as reasons by index, and
    whether it also lists an error of the request as a whole (an entry with no usable Index)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}, False
    errors = body.get("Errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return {}, False
    failed: dict[int, str] = {}
    whole = False
    for error in errors:
        index = error.get("Index") if isinstance(error, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            whole = True
            continue
        failed[index] = _error_text(error)
    return failed, whole


def _error_text(error: dict[str, Any]) -> str:
    message, details = error.get("Message"), error.get("Details")
    text = str(message) if message else "rejected"
    return (f"{text} ({details})" if details else text)[:BODY_EXCERPT_CHARS]


class SegmentDestination(WebhookDestination):
    """POSTs ``{"batch": [...], "sentAt", "writeKey"}`` with HTTP Basic auth (``write_key:``)."""

    Options = SegmentOptions
    default_batch_size = 100

    def endpoint(self) -> str:
        return self.options.url.rstrip("/") + "/v1/batch"

    def client_headers(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.options.write_key}:".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}

    async def encode(self, chunk: Sequence[Event]) -> tuple[bytes, dict[str, str]]:
        now = iso_ms(datetime.now(timezone.utc))
        # We are the sender now: the receiving end corrects clock skew with
        # receivedAt - (sentAt - timestamp), and our events' timestamp is already corrected.
        # Their original sentAt would shift them by however long they waited here.
        batch = [{**event, "sentAt": now} for event in chunk]
        body = orjson.dumps({"batch": batch, "sentAt": now, "writeKey": self.options.write_key})
        if not self.options.gzip:
            return body, {}
        return await asyncio.to_thread(gzip.compress, body, 6), {"Content-Encoding": "gzip"}

    def outcomes(self, chunk: Sequence[Event], response: Response) -> list[Outcome]:
        status = response.status_code
        outcome = outcome_for_status(status, response.headers, response.text)
        if outcome.kind == "retry":
            return [outcome] * len(chunk)
        if response.truncated and outcome.delivered:
            # Items it refused would be listed in the part we did not keep (or could not
            # inflate): the request was taken, so every item counts as delivered, and says so.
            log.warning("event=answer_truncated destination=%s status=%d events=%d detail='the answer "
                        "body was cut or undecodable: item errors in it, if any, were not read'",
                        self.name, status, len(chunk))
        failed, whole = item_errors(response.content, len(chunk))
        if not outcome.delivered and (whole or not failed):
            return [outcome] * len(chunk)  # the request as a whole was refused
        # A refused request stored nothing: the items it did not blame go again, without the others.
        rest = DELIVERED if outcome.delivered else retry(f"HTTP {status}: sent in a batch with rejected events")
        return [rejected(f"HTTP {status}: {failed[i]}") if i in failed else rest for i in range(len(chunk))]
