"""ApiContext: what the routes of one replica share (repositories, service, limits, drain).

Per-token caps live here. Open waits and streams are counted in memory per token on this
replica. Pending tasks are counted in the database per owner (bounded by the cap, so the
count never scans more than cap + 1 rows), at most once per ``pending_refresh_s`` per owner,
plus the submits this replica accepted since: a burst is refused near the cap without a count
query per submit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from fastapi import Request

from inferq.api.auth import Authenticator, check_pools
from inferq.api.errors import ClientGone, ShuttingDown, TooManyPending, TooManyWaits
from inferq.db.llms import Llm, LlmRepository
from inferq.db.pool import Pool
from inferq.db.sessions import WorkerSession, WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.db.tokens import ApiToken, TokenRepository
from inferq.errors import SessionNotFound
from inferq.metrics import Metrics
from inferq.service import TaskService
from inferq.settings import Settings

T = TypeVar("T")

COUNT_PENDING = """
SELECT count(*) FROM (
    SELECT 1 FROM inferq.task WHERE owner_id = %(owner)s AND status = 'pending' LIMIT %(cap)s
) s
"""


class Drain:
    """The replica's shutdown switch: /readyz turns red, new work is refused, waits end."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        self.draining = False
        self.retry_after_s = retry_after_s
        self.event = asyncio.Event()
        self._waits: set[Interruption] = set()

    def start(self) -> None:
        self.draining = True
        self.event.set()
        for wait in list(self._waits):
            wait.interrupt(DRAINED)

    def check(self) -> None:
        """Raise ShuttingDown (503 + Retry-After) once draining."""
        if self.draining:
            raise ShuttingDown(retry_after_s=self.retry_after_s)

    def watch(self, wait: Interruption) -> None:
        """Interrupt ``wait`` when the drain starts (until ``unwatch``)."""
        self._waits.add(wait)

    def unwatch(self, wait: Interruption) -> None:
        self._waits.discard(wait)


DRAINED = "drained"
GONE = "gone"


class Interruption:
    """Ends one guarded wait from outside: the drain or the client's disconnect cancels the
    request's own task, and ``reason`` tells guarded() which error to answer with."""

    __slots__ = ("reason", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.reason: str | None = None

    def interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()


@dataclass
class PendingLimiter:
    pool: Pool
    cap: int
    refresh_s: float = 1.0
    _counts: dict[str, tuple[int, float]] = field(default_factory=dict)

    async def check(self, owner_id: str) -> None:
        """Raise TooManyPending when the owner has ``cap`` pending tasks or more."""
        now = time.monotonic()
        cached = self._counts.get(owner_id)
        if cached is None or now - cached[1] > self.refresh_s or cached[0] >= self.cap:
            cached = (await self._count(owner_id), now)
        if cached[0] >= self.cap:
            self._counts[owner_id] = cached
            raise TooManyPending(
                f"owner {owner_id!r} has {self.cap} pending tasks or more "
                "(INFERQ_MAX_PENDING_PER_TOKEN); retry when some have been claimed",
                retry_after_s=max(1.0, self.refresh_s),
            )
        self._counts[owner_id] = (cached[0] + 1, cached[1])
        if len(self._counts) > 100_000:
            self._counts.clear()

    async def _count(self, owner_id: str) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(COUNT_PENDING, {"owner": owner_id, "cap": self.cap})
            row = await cur.fetchone()
        return int(row[0]) if row else 0


@dataclass
class ApiContext:
    """Everything a route needs; built by the daemon (or a test) around a running pool."""

    settings: Settings
    pool: Pool
    service: TaskService
    listener: Any = None
    metrics: Metrics = field(default_factory=Metrics)
    drain: Drain = field(default_factory=Drain)

    def __post_init__(self) -> None:
        self.tasks = TaskRepository(self.pool)
        self.sessions = WorkerSessionRepository(self.pool)
        self.tokens = TokenRepository(self.pool)
        self.llms = LlmRepository(self.pool)
        self.auth = Authenticator(self.tokens, generation=self._listener_generation)
        self.pending = PendingLimiter(self.pool, self.settings.max_pending_per_token)
        self._waits: dict[UUID, int] = {}
        self._llm_cache: dict[str, tuple[Llm, float]] = {}
        self._session_owner: dict[UUID, tuple[str, list[str]]] = {}
        self._session_touched: dict[UUID, float] = {}

    def _listener_generation(self) -> int:
        stats = getattr(self.listener, "stats", None)
        return int(getattr(stats, "reconnects", 0))

    # -- limits -------------------------------------------------------------------------------

    def acquire_wait(self, token: ApiToken) -> None:
        """Take one of the token's open waits/streams; raises TooManyWaits (429) when full."""
        held = self._waits.get(token.id, 0)
        if held >= self.settings.max_waits_per_token:
            raise TooManyWaits(
                f"this token has {held} open waits and streams "
                f"(INFERQ_MAX_WAITS_PER_TOKEN={self.settings.max_waits_per_token})"
            )
        self._waits[token.id] = held + 1
        self.metrics.open_waits.inc()

    def release_wait(self, token: ApiToken) -> None:
        self.metrics.open_waits.dec()
        left = self._waits.get(token.id, 1) - 1
        if left > 0:
            self._waits[token.id] = left
        else:
            self._waits.pop(token.id, None)

    # -- cached lookups -----------------------------------------------------------------------

    async def resolve_llm(self, name: str) -> Llm:
        """The registry entry for ``name`` (cached 1 s); raises UnknownModel."""
        now = time.monotonic()
        cached = self._llm_cache.get(name)
        if cached is not None and now - cached[1] < 1.0:
            return cached[0]
        llm = await self.llms.resolve(name)
        if len(self._llm_cache) > 10_000:
            self._llm_cache.clear()
        self._llm_cache[name] = (llm, now)
        return llm

    def forget_llm(self, name: str) -> None:
        self._llm_cache.pop(name, None)

    async def check_session(self, session_id: UUID, token: ApiToken) -> list[str]:
        """The pools of a session of the token's owner that the token may serve.

        Raises SessionNotFound for a missing session or another owner's (alike), Forbidden when
        the token may not serve every pool of the session: a token limited to some pools must
        not drive a session bound by a wider token of the same owner. Ownership is remembered
        per replica; whether the session is still alive is decided by the guarded statement
        each worker route runs anyway.
        """
        known = self._session_owner.get(session_id)
        if known is None:
            session = await self.sessions.get(session_id)
            known = (session.owner_id, session.pools)
            self.remember_session(session_id, *known)
        if known[0] != token.owner_id:
            raise SessionNotFound(
                f"worker session {session_id} does not exist or expired; bind again"
            )
        check_pools(token, known[1])
        return known[1]

    def remember_session(self, session_id: UUID, owner_id: str, pools: list[str]) -> None:
        if len(self._session_owner) > 100_000:
            self._session_owner.clear()
        self._session_owner[session_id] = (owner_id, pools)

    def forget_session(self, session_id: UUID) -> None:
        self._session_owner.pop(session_id, None)
        self._session_touched.pop(session_id, None)

    async def live_session(self, session_id: UUID, *, extend: bool = True) -> WorkerSession:
        """The live session, its lifetime extended unless ``extend`` is False; raises
        SessionNotFound when it is gone or expired.

        A claim extends the session, but a worker claims after every batch it receives: an
        UPDATE (a commit, an fsync) per claim is costly. The extension is written at most once
        per tenth of the TTL per replica; in between a plain read still checks the session is
        alive, and its expiry stays at least 90% of the TTL ahead.
        """
        ttl_s = self.settings.session_ttl_s
        now = time.monotonic()
        touched = self._session_touched.get(session_id)
        if not extend or (touched is not None and now - touched < ttl_s / 10):
            return await self.sessions.get(session_id, live=True)
        session = await self.sessions.get(session_id, touch_ttl_s=ttl_s)
        if len(self._session_touched) > 100_000:
            self._session_touched.clear()
        self._session_touched[session_id] = now
        return session

    # -- racing a wait against shutdown and disconnect ----------------------------------------

    async def guarded(
        self,
        coro: Awaitable[T],
        *,
        request: Request | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``coro`` until it ends, the replica drains (ShuttingDown) or the client leaves
        (ClientGone, after awaiting ``on_disconnect``).

        ``coro`` runs in the request's own task; the drain and the disconnect watcher cancel
        that task and say why. An open wait therefore costs the request task and, with a
        ``request``, one small watcher task, instead of a task per racer.
        """
        drain = self.drain
        if drain.draining:
            _close(coro)
            raise ShuttingDown(retry_after_s=drain.retry_after_s)
        task = asyncio.current_task()
        assert task is not None
        stop = Interruption(task)
        drain.watch(stop)
        watcher = None
        if request is not None:
            watcher = asyncio.ensure_future(_watch_disconnect(request.receive, stop))
        try:
            result = await coro
        except asyncio.CancelledError:
            # Someone else's cancellation (the server stopping) stays a cancellation.
            if stop.reason is None or task.uncancel() > 0:
                raise
            if stop.reason == GONE:
                if on_disconnect is not None:
                    await on_disconnect()
                raise ClientGone() from None
            raise ShuttingDown(retry_after_s=drain.retry_after_s) from None
        finally:
            drain.unwatch(stop)
            if watcher is not None:
                watcher.cancel()
        if stop.reason is not None:
            task.uncancel()  # the work swallowed the cancellation and ended anyway
        return result


def _close(coro: Awaitable[Any]) -> None:
    close = getattr(coro, "close", None)
    if close is not None:
        close()


async def _watch_disconnect(receive: Callable[[], Awaitable[Any]], stop: Interruption) -> None:
    """Interrupt the wait when the client closes the connection (the body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stop.interrupt(GONE)


async def get_ctx(request: Request) -> ApiContext:
    """The replica's context. Async on purpose: FastAPI runs a plain ``def`` dependency in its
    thread pool, a thread hop on every request for an attribute read."""
    ctx: ApiContext = request.app.state.ctx
    return ctx
