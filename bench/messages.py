"""The events every figure sends: one realistic track call, shaped as an SDK sends it."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from pipeline.config import SourceConfig
from pipeline.normalise import StoredRequest, expand
from pipeline.sources import SourceRegistry

SOURCE = "bench"
WRITE_KEY = "bench-write-key"
# Sent by wrk and the latency sender; stored as the outbox row's auth_key, as the receiver does.
AUTHORIZATION = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
USER_AGENT = "analytics-python/2.4.0"


def message(tag: str, index: int) -> dict[str, Any]:
    """One track message (about 330 bytes as JSON) with a unique messageId."""
    return {
        "type": "track",
        "userId": f"user-{index % 1000}",
        "event": "Order Completed",
        "properties": {"orderId": f"order-{index}", "revenue": 39.95, "currency": "USD",
                       "products": [{"sku": "sku-1", "price": 19.95, "quantity": 2}]},
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "timestamp": "2024-05-01T12:00:00.000Z",
        "messageId": f"{tag}-{index}",
    }


def track_body(tag: str, index: int = 0) -> bytes:
    return orjson.dumps(message(tag, index))


def batch_body(tag: str, start: int, count: int = 100) -> bytes:
    batch = [message(tag, i) for i in range(start, start + count)]
    return orjson.dumps({"batch": batch, "sentAt": "2024-05-01T12:00:01.000Z"})


def delivered_event_body() -> bytes:
    """What the webhook destination POSTs for one event: the normalised message."""
    request = StoredRequest(id=1, received_at_ms=1714564801000, route="track", body=track_body("sink"),
                            remote_addr="127.0.0.1", auth_key=WRITE_KEY)
    registry = SourceRegistry((SourceConfig(name=SOURCE, write_keys=(WRITE_KEY,)),))
    expansion = expand(request, registry, max_message_bytes=15360)
    return orjson.dumps(expansion.events[0].payload)
