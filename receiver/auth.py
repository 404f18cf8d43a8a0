"""The HTTP Basic username, which Segment-style clients use to carry the write key."""

from __future__ import annotations

import base64
import binascii


def basic_auth_username(header: str | None) -> str | None:
    """The username of ``Authorization: Basic ...``, or None.

    The password is empty in practice, sent with or without the colon; keys encoded with
    ``echo key: | base64`` carry a trailing newline inside the base64, which we drop too.
    """
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    value = value.strip()
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    username = decoded.decode("utf-8", "replace").rstrip("\r\n").split(":", 1)[0].rstrip("\r\n")
    return username or None
