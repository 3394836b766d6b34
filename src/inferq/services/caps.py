"""Caps on what one request may ask a worker for: how many tokens (``max_tokens``, and chat's
newer ``max_completion_tokens``) and how many generations (``n``, and ``best_of`` of the
completions API). Each is capped by the model's registry entry (``inferq llm add --max-tokens
--max-n``, or the admin API), else by the replica's INFERQ_MAX_TOKENS / INFERQ_MAX_N; a request
routed to a pool directly meets the replica's caps.

Checked on the request body as queued, so the OpenAI routes and the native submit's ``request``
alike; a refusal is a 400 naming the field and its cap, and writes nothing. A value that is not
a whole number is refused too: a string such as ``"100000"`` would pass a numeric check here
and be read as a number by a lenient upstream.
"""

from __future__ import annotations

from typing import Any

from inferq.domain.records import Llm
from inferq.errors import AboveCap, InvalidRequest
from inferq.settings import Settings

# Request field -> the cap that bounds it (a registry column and a setting of that name).
_CAPPED = (
    ("max_tokens", "max_tokens"),
    ("max_completion_tokens", "max_tokens"),
    ("n", "max_n"),
    ("best_of", "max_n"),
)


def check_request(body: dict[str, Any], llm: Llm | None, settings: Settings) -> None:
    """Raise AboveCap (or InvalidRequest for a value that is no whole number >= 1) when
    ``body`` asks more than its caps allow."""
    for field, cap_name in _CAPPED:
        value = body.get(field)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not value.is_integer())
            or value < 1
        ):
            raise InvalidRequest(f"`{field}` must be a whole number, at least 1", param=field)
        cap: int = getattr(llm, cap_name, None) or getattr(settings, cap_name)
        if value > cap:
            whose = (
                f"model {llm.name!r} (its registry entry's {cap_name})"
                if llm is not None and getattr(llm, cap_name) is not None
                else f"this server (INFERQ_{cap_name.upper()})"
            )
            raise AboveCap(
                f"`{field}` may be at most {cap} for {whose}; it is {int(value)}", param=field
            )
