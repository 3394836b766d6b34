"""WaitService: waits for outcomes, event streams and claim long-polls, woken by the hub.

Design decisions (DESIGN.md "Notifications"):

- Register the waiter in the hub, THEN read the row, THEN wait: a change committed between the
  read and the wait has already set the waiter's flag, so there is no lost-wakeup window.
- A wake is only a hint. The waiter clears its flags and re-reads; the re-reads of all waiters
  woken together go through one ``Batcher`` (one ``WHERE id = ANY(...)`` for task rows, one
  ``unnest ... JOIN LATERAL`` for chunks), so 10,000 waiters woken by a resync cost a few
  statements, not 10,000.
- The safety poll is one sweep per replica, not a timer per waiter: every
  ``settings.safety_poll_s`` (jittered by up to a fifth) one statement finds which tasks with
  an outcome-only waiter ended (or vanished); those waiters, and every stream and pool waiter,
  are woken into the same batched loaders. 10,000 parked waits cost one small statement per
  period instead of 10,000 row re-reads. Even if every notification were lost, a
  waiter re-reads at least that often. In poll-only mode it is the only mechanism, so latency
  is bounded by it. The sweep runs only while someone waits.
- ``events()``: chunks of an attempt are live while the task is held by a worker or ended while
  held (``claimed_by`` is set). The reader delivers only the contiguous run after its last seq:
  a gap means a flush on another replica has not committed yet, and its notification (or the
  safety poll) wakes the reader again. When the live attempt differs from the one the reader
  streamed (a revert, a re-claim, or a resume with an older ``Last-Event-ID``) it yields
  ResetEvent before any chunk of the new attempt. A terminal status drains the remaining chunks
  of the attempt first and is always the last event; a task already terminal at subscription
  therefore yields its chunks and one terminal StatusEvent.
- Cancelling ``__anext__`` of ``events()`` closes the generator (Python semantics): to send SSE
  heartbeats, pump the iterator in its own task and wait on that task with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar
from uuid import UUID

import structlog

from inferq.db.chunks import ChunkKey, ChunkRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.task import Task, TaskStatus
from inferq.errors import (
    DatabaseUnavailable,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    WaitTimeout,
)
from inferq.settings import Settings
from inferq.wakeups import CHUNKS_ADDED, TASK_CHANGED, Batcher, Hub, Waiter


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """The task changed status (also sent first, with the state at subscription)."""

    task: Task


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    attempt: int
    seq: int
    data: str  # compact JSON, exactly as the worker posted it


@dataclass(frozen=True, slots=True)
class ResetEvent:
    """Chunks of earlier attempts are void: the task was reverted and runs again."""

    attempt: int
    reason: str


Event = StatusEvent | ChunkEvent | ResetEvent


class PoolWaiter(Protocol):
    async def wait(self, timeout_s: float) -> bool:
        """Sleep until work may be claimable in the pools, or the timeout; True when woken."""
        ...


log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# How many seqs one reader fetches per round trip; a longer backlog takes more rounds.
CHUNK_PAGE = 1000


class _PoolWaiter:
    """A PoolWaiter over a hub waiter; the replica's safety sweep wakes it too."""

    def __init__(self, waiter: Waiter) -> None:
        self._waiter = waiter

    async def wait(self, timeout_s: float) -> bool:
        """True when woken (new work, a resync or the safety sweep): worth trying to claim."""
        woken = await self._waiter.wait(timeout_s)
        self._waiter.take()
        return woken


class WaitService:
    """One per replica. Owns no connection: reads through the repositories, woken by the hub.

    Without a ``hub`` fed by a Listener, waiters only see the safety poll (poll-only mode).
    """

    def __init__(
        self,
        tasks: TaskRepository,
        chunks: ChunkRepository,
        settings: Settings,
        *,
        hub: Hub | None = None,
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.chunks = chunks
        self.hub = hub or Hub()
        window_s = settings.wake_batch_ms / 1000
        self._task_loader: Batcher[UUID, Task] = Batcher(self._fetch_tasks, window_s=window_s)
        self._chunk_loader: Batcher[ChunkKey, list[tuple[int, str]]] = Batcher(
            self._fetch_chunks, window_s=window_s, max_batch=1000
        )
        self._sweeper: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Stop the safety sweep."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def _ensure_sweeper(self) -> None:
        """Start the safety sweep when the first waiter arrives (it ends when none is left)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="inferq-safety-sweep")

    async def _sweep(self) -> None:
        period_s = self.settings.safety_poll_s
        while True:
            # Jittered so replicas started together do not sweep in the same instant; the
            # setting stays the upper bound a lost notification can cost.
            await asyncio.sleep(period_s * random.uniform(0.8, 1.0))
            if self.hub.waiter_count == 0:
                return
            # Outcome waiters are the bulk (every parked wait): one statement of small rows
            # says which of them could see something new, instead of a full re-read each.
            ids = self.hub.outcome_task_ids()
            try:
                finished = await self.tasks.finished_among(ids) if ids else set()
            except Exception as exc:
                log.warning("safety_sweep_failed", waiters=len(ids), error=str(exc))
                finished = set(ids)  # let them re-read and meet the error themselves
            self.hub.sweep(finished)

    # -- batched re-reads -------------------------------------------------------------------

    async def _fetch_tasks(self, ids: Sequence[UUID]) -> dict[UUID, Task]:
        return {task.id: task for task in await self.tasks.get_many(ids)}

    async def _fetch_chunks(
        self, keys: Sequence[ChunkKey]
    ) -> dict[ChunkKey, list[tuple[int, str]]]:
        found = await self.chunks.read_many(keys, page=CHUNK_PAGE)
        return {keys[i]: chunks for i, chunks in found.items()}

    async def _retried(self, load: Callable[[K], Awaitable[V | None]], key: K) -> V | None:
        """``load(key)``, tried again while the database is unavailable, for up to
        ``settings.db_retry_s``: a PostgreSQL restart of under a second, or a dead pooled
        connection (discarded once it failed), must not end a wait or a stream. The first
        retry is immediate, the next ones back off."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.db_retry_s
        delay = 0.0
        while True:
            try:
                return await load(key)
            except DatabaseUnavailable as exc:
                if loop.time() + delay >= give_up:
                    raise
                log.info("read_retried", error=exc.message, delay_s=round(delay, 3))
                await asyncio.sleep(delay)
                delay = min(1.0, max(0.05, delay * 2))

    async def _first_read(self, task_id: UUID, owner_id: str | None) -> Task:
        """The row right after registering the waiter; batched too, so 10,000 waits that start
        together cost a few statements and never queue for the pool."""
        task = await self._retried(self._task_loader.load, task_id)
        if task is None or (owner_id is not None and task.owner_id != owner_id):
            raise TaskNotFound(f"task {task_id} not found")
        return task

    async def _reload(self, task_id: UUID) -> Task:
        task = await self._retried(self._task_loader.load, task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found (it was deleted)")
        return task

    async def _next_chunks(
        self, task_id: UUID, attempt: int, last_seq: int
    ) -> list[tuple[int, str]]:
        """The contiguous (seq, data) after ``last_seq`` that are stored now."""
        run: list[tuple[int, str]] = []
        while True:
            page_end = last_seq + CHUNK_PAGE
            key = (task_id, attempt, last_seq)
            page = await self._retried(self._chunk_loader.load, key) or []
            for chunk in page:
                if chunk[0] != last_seq + 1:
                    return run  # a gap: that chunk is still in flight on another replica
                run.append(chunk)
                last_seq = chunk[0]
            if last_seq < page_end:
                return run

    # -- waits ------------------------------------------------------------------------------

    async def wait_terminal(
        self, task_id: UUID, timeout_s: float, *, owner_id: str | None = None
    ) -> Task:
        """The task once terminal, or its current state at the deadline (never raises on
        timeout). Raises TaskNotFound (also for another owner's task)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.hub.watch_task(task_id, terminal_only=True) as waiter:
            self._ensure_sweeper()
            task = await self._first_read(task_id, owner_id)
            while not task.terminal:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Not kept while parked (a row with its request is ~1 KB per open wait): the
                # loop reads it again after every wake-up, the deadline's included.
                del task
                await waiter.wait(remaining)
                waiter.take()
                task = await self._reload(task_id)
            return task

    async def wait_claimed(
        self, task_id: UUID, timeout_s: float, *, owner_id: str | None = None
    ) -> Task:
        """The task once a worker took it (or it ended), or as it is at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.hub.watch_task(task_id) as waiter:
            self._ensure_sweeper()
            task = await self._first_read(task_id, owner_id)
            while task.status is TaskStatus.PENDING:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await waiter.wait(remaining)
                waiter.take()
                task = await self._reload(task_id)
            return task

    async def wait_for(
        self, task_id: UUID, timeout_s: float, *, owner_id: str | None = None
    ) -> Task:
        """The completed task. Raises TaskCancelled, TaskFailed (worker's message),
        WaitTimeout at the deadline, TaskNotFound."""
        task = await self.wait_terminal(task_id, timeout_s, owner_id=owner_id)
        if task.status is TaskStatus.COMPLETED:
            return task
        if task.status is TaskStatus.CANCELLED:
            raise TaskCancelled(task.error_message or f"task {task_id} was cancelled", task=task)
        if task.status is TaskStatus.ERROR:
            raise TaskFailed(task.error_message or f"task {task_id} failed", task=task)
        raise WaitTimeout(f"task {task_id} is still {task.status} after {timeout_s:g} s", task=task)

    def events(
        self,
        task_id: UUID,
        *,
        owner_id: str | None = None,
        after: tuple[int, int] | None = None,
    ) -> AsyncIterator[Event]:
        """Status changes and chunks of a task in order, gap-free per attempt, from ``after``
        (attempt, seq) exclusive. Ends after the terminal StatusEvent. Raises TaskNotFound
        before the first event.

        The first event is a StatusEvent with the state at subscription, except for a task
        already terminal: its remaining chunks come first and its one terminal StatusEvent
        last. Exactly one terminal StatusEvent is ever yielded, always as the last event.
        """
        return self._events(task_id, owner_id, after)

    async def _events(
        self, task_id: UUID, owner_id: str | None, after: tuple[int, int] | None
    ) -> AsyncIterator[Event]:
        with self.hub.watch_task(task_id) as waiter:
            self._ensure_sweeper()
            task = await self._first_read(task_id, owner_id)
            attempt, last_seq = after if after is not None else (_live_attempt(task), 0)
            shown: tuple[TaskStatus, int] | None = None
            while True:
                live = _live_attempt(task)
                if live != attempt:
                    if last_seq > 0:
                        yield ResetEvent(live, _reset_reason(task))
                    attempt, last_seq = live, 0
                if not task.terminal and shown != (task.status, task.attempt):
                    shown = (task.status, task.attempt)
                    yield StatusEvent(task)
                if task.claimed_by is not None:
                    for seq, data in await self._next_chunks(task_id, attempt, last_seq):
                        last_seq = seq
                        yield ChunkEvent(attempt, seq, data)
                if task.terminal:
                    yield StatusEvent(task)
                    return
                while True:
                    await waiter.wait(math.inf)
                    announced = waiter.chunks_upto
                    flags = waiter.take()
                    # A chunk wake for chunks this reader already delivered (its last read
                    # raced the flush that announced them) needs no read at all.
                    if flags != CHUNKS_ADDED or announced > (attempt, last_seq):
                        break
                # A chunk-only wake needs no row; a status wake, a resync or a poll does.
                if flags & TASK_CHANGED or not flags:
                    task = await self._reload(task_id)

    def pool_waiter(self, pools: Sequence[str]) -> AbstractAsyncContextManager[PoolWaiter]:
        """Register interest in new pending work of ``pools`` (before trying to claim).

        ``wait()`` returns True when woken, and also when the safety poll elapsed before the
        timeout (the claim should be retried); False only at the timeout.
        """
        return self._pool_waiter(pools)

    @asynccontextmanager
    async def _pool_waiter(self, pools: Sequence[str]) -> AsyncIterator[PoolWaiter]:
        with self.hub.watch_pools(pools) as waiter:
            self._ensure_sweeper()
            yield _PoolWaiter(waiter)


def _live_attempt(task: Task) -> int:
    """The attempt whose chunks a reader should stream now.

    A task that is not held (pending, or ended without a holder) has no live chunks: its next
    chunks will belong to the next claim, which increments the attempt.
    """
    return task.attempt if task.claimed_by is not None else task.attempt + 1


def _reset_reason(task: Task) -> str:
    if task.terminal:
        return f"the attempt was abandoned; the task ended {task.status}"
    return "the worker was lost; the task runs again"
