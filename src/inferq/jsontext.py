"""dumps: compact JSON bytes for the replica, the repositories and the worker SDK alike.

orjson first (fast), the standard library for what orjson refuses: integers past 64 bits.
jsonb prints a float such as 1e26 back as a 27-digit integer and a client may send one; without
the fallback such a request could be stored but never shown, claimed, streamed or finished.
Depends on nothing of the server, so the worker SDK can use it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson


def dumps(content: Any) -> bytes:
    """``content`` as compact JSON (UUIDs as strings, datetimes in ISO 8601, as orjson)."""
    try:
        return orjson.dumps(content)
    except TypeError:
        return json.dumps(content, default=_plain, separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
