"""JSON read so that every number keeps the digits it was sent with.

orjson (the parser everywhere else: 3-5x faster than the standard library's) turns an integer
beyond 64 bits into a float, ``1234567890123456789012345`` into ``1.2345678901234568e+24``, a
decimal with more digits than a double holds into its nearest double, a decimal whose exponent
underflows (``1e-400``) into ``0.0``, and refuses a number past a double's range (``1e400``, an
integer of 400 digits) as infinity. :func:`loads` parses with orjson, which also decides what is
valid JSON at all, and parses again with the standard library, keeping each number orjson would
change as an ``orjson.Fragment`` of its own text, only when the text may hold such a number:

- a run of 16 or more digits and points (no number with fewer digits can lose anything:
  every integer below 2^53, and every decimal of 15 significant digits, survives as a double;
  the point counts, or ``82.15390486277237``, 16 digits in runs of 2 and 14, was read as the
  double ``82.15390486277236``; such a body now costs 5.6-8.8 us to read instead of 0.9-1.6,
  while the bench's R1 and R3 bodies, which hold none, stay on orjson alone: 2.1-3.0 and
  141-164 us before and after, in-process, alternating);
- a negative exponent of three digits or more (``1e-400``, ``4e-324``), the only way a shorter
  number falls out of a double's normal range;
- a number orjson refuses as infinity: the standard library then reads the body, held to
  orjson's rules (strict UTF-8, no NaN or Infinity, no lone surrogates), or it is refused.

orjson writes a Fragment back verbatim, so such a number is delivered exactly as sent. (An
integer ``-0`` is read as ``0``: the same number.)

Finding out costs one ``bytes.translate`` and two substring searches (measured on a loaded
2-core VM: 50 us for a 31 KB batch, 0.8 us for a single event, against orjson's 130 us and
1.8 us to parse them; a regular expression took 256 us), plus a few byte comparisons for each
look-alike of a tiny exponent in a hex id or a word (``3f5e-4005``, ``page-404``).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

Fragment = orjson.Fragment


def _class(i: int) -> int:
    char = chr(i)
    if (char.isdigit() and i < 128) or char == ".":
        # A point counts as a digit: 16 significant digits with a point among them
        # ("82.15390486277237") are as long a run as 16 without.
        return ord("0")
    if char in "eE":
        return ord("e")
    if char == "-":
        return i
    if char.isalpha() or char == "_" or i >= 128:
        return ord("x")  # part of a word or an id: a digit after it is not a number's start
    return ord(" ")  # a delimiter ("+" too: no number starts with it)


# Each byte to its class: a run of digits becomes a run of zeros, an exponent "e-000".
_CLASSES = bytes(_class(i) for i in range(256))
_LONG_RUN = b"0" * 16
# The only way a number of fewer than 16 digits loses its value: a negative exponent of three
# digits or more, past a double's smallest normal number (10^-307). One beyond its largest
# (1e400) is refused by orjson as infinity (see loads).
_TINY = b"e-000"
_DIGIT, _MINUS, _DELIMITER = ord("0"), ord("-"), ord(" ")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_INFINITY = "number is infinity"


def may_lose_digits(data: bytes) -> bool:
    classes = data.translate(_CLASSES)
    return _LONG_RUN in classes or (_TINY in classes and _tiny_number(classes))


def _tiny_number(classes: bytes) -> bool:
    """Whether some "e-000" in ``classes`` is the exponent of a number (digits and a point
    back to a minus or a delimiter, a delimiter after its digits) rather than part of a hex id
    ("3f5e-4005") or a word ("page-404")."""
    at = classes.find(_TINY)
    while at >= 0:
        start = at - 1
        # At most 15 digits and points: a longer mantissa is a long run, found already.
        while start >= 0 and at - start <= 16 and classes[start] == _DIGIT:
            start -= 1
        if start >= 0 and classes[start] == _MINUS:
            start -= 1
        end = at + len(_TINY)
        while end < len(classes) and end - at <= 20 and classes[end] == _DIGIT:
            end += 1
        if at >= 1 and classes[at - 1] == _DIGIT and (start < 0 or classes[start] == _DELIMITER) and \
                (end == len(classes) or classes[end] == _DELIMITER):
            return True
        at = classes.find(_TINY, at + 1)
    return False


def _integer(text: str) -> int | Fragment:
    if len(text) > 20:  # past 64 bits whatever it is (and int() refuses 4,300 digits)
        return Fragment(text)
    value = int(text)
    return value if _INT64_MIN <= value <= _UINT64_MAX else Fragment(text)


def _decimal(text: str) -> float | Fragment:
    value = float(text)
    # The double, written back as orjson writes it, must be the same number as the text.
    return value if Decimal(repr(value)) == Decimal(text) else Fragment(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact(text: str | bytes) -> Any:
    return json.loads(text, parse_int=_integer, parse_float=_decimal, parse_constant=_no_constant)


def loads(data: bytes) -> Any:
    """Parse ``data`` (raises orjson.JSONDecodeError as orjson.loads does); numbers exact."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if not exc.msg.startswith(_INFINITY):
            raise
        return _beyond_double(data, exc)
    if not may_lose_digits(data):
        return value
    try:
        return _exact(data)
    except RecursionError:
        # Nested past what the standard library's parser can recurse: far deeper than the 255
        # levels anything here accepts (pipeline/envelope.py), so it is refused whatever its
        # numbers.
        return value


def _beyond_double(data: bytes, refusal: orjson.JSONDecodeError) -> Any:
    """A body orjson refused only (as far as it read) for a number past a double's range: read by
    the standard library, held to what orjson accepts, or ``refusal`` raised."""
    try:
        value = _exact(data.decode("utf-8"))  # strict: invalid UTF-8 and encoded surrogates fail
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise refusal from None
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "surrogates" in str(exc):  # a lone surrogate escape ("\ud800"), which orjson refuses
            raise refusal from None
        # Nested past the 255 levels orjson writes: refused as too deep (pipeline/envelope.py).
    return value


def is_exact_number(value: Any) -> bool:
    """A number kept as its text because no int or float holds it."""
    return isinstance(value, Fragment)
