"""RevocationWatch: each replica looks for revoked tokens every INFERQ_REVOCATION_POLL_S.

The TOKEN notification (inferq.db.listener) tells a replica about a revocation within
milliseconds, but none arrives in poll-only mode, nor while the listener is away, nor over a
half-open connection until the listener notices. The poll bounds all of those: one indexed
statement (api_token_revoked_idx) per period per replica lists the tokens revoked within
``WINDOW_S``, and each one this replica did not know of yet goes through
``Authenticator.revoked`` (cache dropped, open waits and streams ended). The window is much
longer than the period because ``revoked_at`` is the revoking transaction's start time: a
revocation that commits late is still inside it when it becomes visible.
``run_once()`` is the whole job; ``run()`` is a thin loop around it (tests call ``run_once``).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from inferq.db.tokens import TokenRepository
from inferq.services.auth import Authenticator

log = structlog.get_logger(__name__)

WINDOW_S = 60.0


class RevocationWatch:
    """Polls for revoked tokens; ``start()`` once, ``stop()`` on shutdown."""

    def __init__(self, tokens: TokenRepository, auth: Authenticator, period_s: float) -> None:
        self.tokens = tokens
        self.auth = auth
        self.period_s = period_s
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Apply the revocations this replica did not know of; how many there were."""
        fresh = 0
        for token_id in await self.tokens.recently_revoked(WINDOW_S):
            if self.auth.revoked(token_id):
                fresh += 1
                log.info("token_revocation_seen", token_id=str(token_id), by="poll")
        return fresh

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("revocation_poll_failed", error=str(exc))
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="inferq-revocation-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
