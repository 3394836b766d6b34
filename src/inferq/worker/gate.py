"""BackendGate: whether the worker's backend can take work, and the wait until it can.

The runner asks :meth:`BackendGate.wait_ready` before every bind. With a check (for
`inferq worker --backend URL`, ``OpenAIBackend.check``), it returns once the check passes,
checking with jittered exponential backoff and logging each failure. A handler that raised
BackendUnavailableError marks the gate down (:meth:`mark_down`): the runner unbinds, and the
next wait first backs off (longer after each failure that no completed task followed, so a
backend that answers its health check but fails every request is not hammered) before it
checks again. Without a check the backoff alone decides.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("inferq.worker")

BackendCheck = Callable[[], Awaitable[bool]]


class BackendGate:
    """Tracks backend failures; :meth:`wait_ready` blocks while the backend is down."""

    def __init__(self, check: BackendCheck | None, backoff_max_s: float = 30.0) -> None:
        self.check = check
        self.backoff_max_s = backoff_max_s
        self.down = asyncio.Event()
        self._failures = 0  # backend failures since the last completed task

    def mark_down(self) -> None:
        """A task failed to reach the backend: pause (the runner watches ``down``)."""
        if not self.down.is_set():
            self._failures += 1
            self.down.set()

    def mark_ok(self) -> None:
        """A task completed: the backend works."""
        self._failures = 0

    async def wait_ready(self) -> None:
        """Return once the backend may take work; clears ``down``."""
        if self.down.is_set():
            await asyncio.sleep(self._delay(self._failures - 1))
        for n in range(1_000_000):
            if self.check is None or await self.check():
                if self.down.is_set() or n:
                    log.info("backend_available", checks=n + 1)
                self.down.clear()
                return
            delay = self._delay(n)
            log.warning("backend_unavailable", retry_in_s=round(delay, 2), checks=n + 1)
            await asyncio.sleep(delay)

    def _delay(self, n: int) -> float:
        return random.uniform(0.5, 1.0) * min(self.backoff_max_s, 0.5 * 2.0 ** min(n, 30))
