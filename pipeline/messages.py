"""Validation of one Segment-style message: the one place these rules live.

The receiver calls :func:`validate_message` to answer 200/207/400; the worker calls the same
function when it decodes a stored request, so a message is judged the same way twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.exactjson import is_exact_number

MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias")
TIMESTAMP_FIELDS = ("timestamp", "sentAt", "originalTimestamp")
OBJECT_FIELDS = ("context", "integrations", "properties", "traits")
MAX_MESSAGE_ID = 100
INVALID_WRITE_KEY = "Invalid or missing writekey"


@dataclass(frozen=True)
class Problem:
    """Why input was refused: a machine ``code``, the spec's ``Message`` and ``Details``."""

    code: str
    message: str
    details: str = ""
    status: int = 400
    error: str = "Bad Request"


def present(value: Any) -> bool:
    """``null`` and ``""`` count as absent: analytics-python sends ``"anonymousId": null``."""
    return value is not None and value != ""


def _is_id(value: Any) -> bool:
    # A non-empty string or a number, kept as sent. bool is an int in Python; not an id.
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _not_an_id(key: str, value: Any) -> str:
    """Why ``value`` is not an id (the details of its 400)."""
    if is_exact_number(value):
        # Kept as its digits in properties (pipeline/exactjson.py); an id must also be
        # compared, stored in columns and deduplicated, so it is refused rather than changed.
        return f"{key} is a number too large to keep exactly (beyond 64 bits): send it as a string"
    return f"{key} must be a string or a number"


def parse_timestamp(value: str) -> datetime:
    """ISO-8601 to an aware UTC datetime; no offset means UTC. Raises ValueError."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # "0001-01-01T00:00:00+02:00" is before year 1 in UTC
        raise ValueError(f"{value!r} is out of range in UTC") from None


def message_type(message: dict[str, Any], route_type: str | None) -> str | None:
    """The type the message has once the route fills a missing one (None if it has none)."""
    declared = message.get("type")
    return route_type if declared is None else declared


def validate_message(message: Any, route_type: str | None = None) -> Problem | None:
    """Return the first problem that makes ``message`` unacceptable, or None.

    Args:
        message: the decoded JSON of one message.
        route_type: the type a single-message route stands for ("track" for /v1/track); it
            fills a missing ``type`` and a different declared type is an error.
    """
    if message.__class__ is dict and _plainly_valid(message, route_type):
        return None
    return first_problem(message, route_type)


def first_problem(message: Any, route_type: str | None = None) -> Problem | None:
    """The rules one by one: the first problem of ``message``, or None.

    A new rule must be mirrored in :func:`_plainly_valid` (which must refuse what it refuses),
    and its field added to the differential test in tests/test_validation.py."""
    if not isinstance(message, dict):
        return Problem("invalid_message", "Message must be a JSON object",
                       f"got {type(message).__name__}")
    problem = _check_type(message, route_type)
    if problem is None:
        problem = _check_identity(message, message_type(message, route_type))
    if problem is None:
        problem = _check_fields(message)
    return problem


def _plainly_valid(message: dict[str, Any], route_type: str | None) -> bool:
    """True for a message of the common shape that every rule below accepts; False when in
    doubt, and the rules one by one then decide (and say why). One pass, no calls but the
    timestamps' parse: it runs for every message of every batch (see bench R3), and
    tests/test_validation.py checks it never accepts what the rules refuse."""
    get = message.get
    declared = get("type")
    if declared is None:
        kind = route_type
    elif declared.__class__ is str and declared in MESSAGE_TYPES and (route_type is None or declared == route_type):
        kind = declared
    else:
        return False
    if kind is None:
        return False
    user_id, anonymous_id = get("userId"), get("anonymousId")
    if user_id.__class__ is str:
        identified = user_id != ""
    elif user_id is None:
        identified = False
    else:
        return False
    if anonymous_id.__class__ is str:
        identified = identified or anonymous_id != ""
    elif anonymous_id is not None:
        return False
    if not identified:
        return False
    if kind == "track":
        name = get("event")
        if name.__class__ is not str or name == "":
            return False
    elif kind == "alias" or kind == "group":
        wanted = get("previousId" if kind == "alias" else "groupId")
        if wanted.__class__ is not str or wanted == "":
            return False
    message_id = get("messageId")
    if message_id is not None and (message_id.__class__ is not str or len(message_id) > MAX_MESSAGE_ID
                                   or "\x00" in message_id):
        return False
    for key in TIMESTAMP_FIELDS:
        value = get(key)
        if value is not None:
            if value.__class__ is not str:
                return False
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                return False
            if moment.year == 1 or moment.year == 9999:  # an offset may take it out of range in UTC
                return False
    for key in OBJECT_FIELDS:
        value = get(key)
        if value is not None and value.__class__ is not dict:
            return False
    key = get("writeKey")
    return key is None or key.__class__ is str


def _check_type(message: dict[str, Any], route_type: str | None) -> Problem | None:
    declared = message.get("type")
    if declared is None:
        if route_type is None:
            return Problem("missing_type", "Missing type",
                           f"type must be one of {', '.join(MESSAGE_TYPES)}")
        return None
    if not isinstance(declared, str) or declared not in MESSAGE_TYPES:
        return Problem("invalid_type", "Invalid type",
                       f"type {declared!r} is not one of {', '.join(MESSAGE_TYPES)}"[:300])
    if route_type is not None and declared != route_type:
        return Problem("type_mismatch", "Type does not match the endpoint",
                       f"{'an' if declared[0] in 'aeiou' else 'a'} {declared} message was sent to the {route_type} endpoint")
    return None


def _check_identity(message: dict[str, Any], kind: str) -> Problem | None:
    for key in ("userId", "anonymousId"):
        value = message.get(key)
        if value.__class__ is not str and present(value) and not _is_id(value):
            return Problem("invalid_user_id", f"Invalid {key}", _not_an_id(key, value))
    if kind == "alias":
        previous = message.get("previousId")
        if not present(previous):
            return Problem("missing_previous_id", "Missing previousId", "alias needs previousId")
        if not _is_id(previous):
            return Problem("invalid_previous_id", "Invalid previousId", _not_an_id("previousId", previous))
    if not (present(message.get("userId")) or present(message.get("anonymousId"))):
        return Problem("missing_user_id", "Missing userId or anonymousId",
                       "a userId or an anonymousId is required")
    if kind == "track":
        name = message.get("event")
        if not present(name):
            name = message.get("eventName")
        if not present(name):
            return Problem("missing_event", "Missing event", "track needs an event name")
        if not isinstance(name, str):
            return Problem("invalid_event", "Invalid event", "event must be a string")
    if kind == "group":
        group_id = message.get("groupId")
        if not present(group_id):
            return Problem("missing_group_id", "Missing groupId", "group needs a groupId")
        if not _is_id(group_id):
            return Problem("invalid_group_id", "Invalid groupId", _not_an_id("groupId", group_id))
    return None


def _check_fields(message: dict[str, Any]) -> Problem | None:
    message_id = message.get("messageId")
    # No NUL: it is the deduplication key, stored as text, and Postgres text cannot hold NUL.
    if message_id is not None and (not isinstance(message_id, str) or len(message_id) > MAX_MESSAGE_ID
                                   or "\x00" in message_id):
        return Problem("invalid_message_id", "Invalid messageId",
                       f"messageId must be a string of at most {MAX_MESSAGE_ID} characters, without NUL")
    get = message.get
    for key in TIMESTAMP_FIELDS:
        if get(key) is not None:
            problem = check_timestamp(message, key)
            if problem is not None:
                return problem
    for key in OBJECT_FIELDS:
        value = get(key)
        if value is not None and value.__class__ is not dict:
            return check_object(message, key)
    key = get("writeKey")
    if key is not None and not isinstance(key, str):
        return Problem("invalid_write_key", INVALID_WRITE_KEY, "writeKey must be a string")
    return None


def check_timestamp(obj: dict[str, Any], key: str) -> Problem | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parse_timestamp(value)
            return None
        except ValueError:
            pass
    return Problem("invalid_timestamp", f"Invalid {key}",
                   f"{key} must be an ISO-8601 date string, got {value!r}"[:300])


def check_object(obj: dict[str, Any], key: str) -> Problem | None:
    value = obj.get(key)
    if value is None or isinstance(value, dict):
        return None
    return Problem(f"invalid_{_snake(key)}", f"Invalid {key}", f"{key} must be a JSON object")


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)
