"""Lanes: the fixed set a pool serves in order, OpenAI's service_tier names for them, and what
a token may ask for.

A pool serves ``interactive``, then ``default``, then ``batch``: a claim takes from a lane only
when every lane before it has nothing claimable (but for tasks past the aging bound, which go
first whatever their lane). OpenAI's ``service_tier`` picks the lane on the OpenAI routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Lane = Literal["interactive", "default", "batch"]

# The serving order, first served first; the claim (inferq.db.task_queries) follows it.
LANES: tuple[Lane, ...] = ("interactive", "default", "batch")
DEFAULT_LANE: Lane = "default"

# OpenAI's `service_tier` values and the lane each one asks for.
SERVICE_TIERS: dict[str, Lane] = {
    "priority": "interactive",
    "default": "default",
    "auto": "default",
    "flex": "batch",
}

PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


@dataclass(frozen=True, slots=True)
class LanePolicy:
    """The lanes and priority range a token may use, and its owner's weight in a lane. The
    defaults are what a token made without options gets: everything, weight 1."""

    lanes: Sequence[Lane] = LANES
    priority_min: int = PRIORITY_MIN
    priority_max: int = PRIORITY_MAX
    weight: int = 1

    def refusal(self, lane: str, priority: int) -> str | None:
        """Why a task in ``lane`` at ``priority`` is refused, naming what may be used; None
        when it is allowed."""
        if lane in self.lanes and self.priority_min <= priority <= self.priority_max:
            return None
        return (
            f"this token may not submit to lane {lane!r} at priority {priority}: it may use "
            f"lane(s) {', '.join(self.lanes)} and priorities {self.priority_min} to "
            f"{self.priority_max}"
        )
