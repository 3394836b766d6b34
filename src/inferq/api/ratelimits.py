"""OpenAI's rate-limit headers (x-ratelimit-*) from a token's windows (inferq.services.quotas).

Only the limits a token has are sent: a token without a requests-per-minute quota gets no
``-requests`` headers, one without a tokens quota no ``-tokens`` headers. The tokens headers
describe tokens per minute when the token has that quota, else tokens per day. Resets are
durations as OpenAI writes them (``17s``, ``6m0s``, ``3h2m0s``), rounded up to the second.
"""

from __future__ import annotations

import math

from inferq.domain.quotas import RateLimits


def rate_limit_headers(limits: RateLimits | None) -> dict[str, str]:
    """The x-ratelimit-* headers of ``limits`` (none for None)."""
    if limits is None:
        return {}
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset_s in (
        ("requests", limits.requests_limit, limits.requests_remaining, limits.requests_reset_s),
        ("tokens", limits.tokens_limit, limits.tokens_remaining, limits.tokens_reset_s),
    ):
        if limit is not None and remaining is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(reset_s)
    return headers


def duration(seconds: float) -> str:
    """``seconds`` rounded up, as OpenAI's reset headers write it."""
    total = max(1, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
