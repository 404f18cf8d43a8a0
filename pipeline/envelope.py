"""A stored request body opened into its messages, each judged on its own.

The receiver judges a request to answer it; the worker opens the same stored bytes the same
way to expand them into events. Both go through :func:`open_envelope` and :func:`judge`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from pipeline import exactjson
from pipeline.messages import INVALID_WRITE_KEY, Problem, check_object, check_timestamp, validate_message
from pipeline.sources import message_write_key

# What a route's body holds: one message, a {"batch": [...]} object, or either (webhooks).
SINGLE, BATCH, WEBHOOK = "single", "batch", "webhook"


class Refused(Exception):
    """The request as a whole is unacceptable; nothing in it goes on."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass
class Envelope:
    """A parsed body: its messages, and the batch-level fields that apply to each of them."""

    is_batch: bool
    items: list[Any]
    batch: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_key(self) -> str | None:
        key = self.batch.get("writeKey")
        return key if isinstance(key, str) and key else None


class Verdict(NamedTuple):
    """One message's fate: accepted for ``source``, or refused with ``problem``.
    (A tuple: one is made per message of every request.)"""

    index: int
    problem: Problem | None
    source: str | None = None


# A Verdict built without the NamedTuple's Python-level __new__: half the cost, once per
# message of every request (bench R3).
_new_verdict = tuple.__new__


# orjson reads JSON nested up to 1024 levels but writes at most 255, and every message we
# accept is written again when the worker stores it as an event: a deeper one is refused now,
# with a 400, rather than acknowledged and never storable.
TOO_DEEP = Problem("nesting_too_deep", "Message nested too deeply",
                   "JSON nested more than 255 levels deep cannot be stored")


def dumped(value: Any) -> bytes | None:
    """``value`` written back as compact JSON; None if orjson cannot (parsed JSON fails only
    by nesting too deep)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None


def writable(value: Any) -> bool:
    return dumped(value) is not None


def parse_json(body: bytes) -> Any:
    try:
        return exactjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused(Problem("invalid_json", "Invalid JSON", str(exc)[:300])) from None


def open_envelope(body: bytes, kind: str) -> Envelope:
    """Parse a body for a route of ``kind``; raise :class:`Refused` if it cannot be used at all."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise Refused(Problem("invalid_body", "Body must be a JSON object",
                              f"got {type(data).__name__}"))
    if kind == SINGLE or (kind == WEBHOOK and "batch" not in data):
        return Envelope(is_batch=False, items=[data])
    items = data.get("batch")
    if not isinstance(items, list):
        raise Refused(Problem("invalid_batch", "Missing batch", "batch must be an array of messages"))
    if not items:
        raise Refused(Problem("empty_batch", "Empty batch", "batch holds no messages"))
    for check, key in ((check_object, "context"), (check_object, "integrations"), (check_timestamp, "sentAt")):
        problem = check(data, key)
        if problem is not None:
            raise Refused(problem)
    key = data.get("writeKey")
    if key is not None and not isinstance(key, str):
        raise Refused(Problem("invalid_write_key", INVALID_WRITE_KEY, "writeKey must be a string"))
    return Envelope(is_batch=True, items=items, batch=data)


def judge(envelope: Envelope, *, route_type: str | None, override_key: str | None,
          auth_key: str | None, source_for: Callable[[str | None], str | None],
          max_message_bytes: int, body_size: int) -> list[Verdict]:
    """Judge every message: its shape, its size inside a batch, and its write key."""
    verdicts = []
    # A message inside a batch is measured as its compact JSON; when the whole body is under
    # the limit no message can be over it, and we skip re-serialising.
    measure = envelope.is_batch and body_size > max_message_bytes
    # Most requests carry one key for all their messages: look each distinct key up once.
    known: dict[str | None, str | None] = {}
    batch_key = envelope.batch_key
    # Whether some message may be too deep to write back: measuring writes every message
    # anyway; otherwise one write of the whole body (about 1 us a KB) tells.
    may_be_deep = measure or not writable(envelope.batch if envelope.is_batch else envelope.items[0])
    # Batch-level context and integrations are merged into every message of the batch.
    batch_deep = may_be_deep and envelope.is_batch and \
        not writable({key: envelope.batch.get(key) for key in ("context", "integrations")})
    for index, message in enumerate(envelope.items):
        problem = validate_message(message, route_type)
        if problem is None and batch_deep:
            problem = TOO_DEEP
        if problem is None and measure:
            problem = _size_problem(message, max_message_bytes)
        elif problem is None and may_be_deep and not writable(message):
            problem = TOO_DEEP
        # The source of a refused message too, where its key tells: refusals are counted
        # per source, and an operator needs to know which source sends bad messages.
        key = message_write_key(message, override_key, batch_key, auth_key)
        if key in known:
            source = known[key]
        else:
            source = known[key] = source_for(key)
        if source is None and problem is None:
            problem = Problem("invalid_write_key", INVALID_WRITE_KEY)
        verdicts.append(_new_verdict(Verdict, (index, problem, source)))
    return verdicts


def _size_problem(message: Any, max_message_bytes: int) -> Problem | None:
    """A batch item over the per-message limit as compact JSON, or too deep to write at all."""
    written = dumped(message)
    if written is None:
        return TOO_DEEP
    size = len(written)
    if size > max_message_bytes:
        return Problem("message_too_large", "Message too large",
                       f"message is {size} bytes, the limit is {max_message_bytes}", status=413)
    return None
