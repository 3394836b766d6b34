"""ChunkRelay: buffers workers' chunk posts of all tasks and stores them once per flush window.

Design decisions:

- A notifying commit takes a cluster-wide lock, so chunks are never written one post at a time:
  every post of every task buffered when a flush starts goes into ONE ``ChunkRepository.append``
  (one statement, one CHUNK notification per payload).
- Group commit: one flush is written at a time, and posts arriving meanwhile fill the next
  buffer, which is flushed as soon as the previous flush committed. Under load the batch grows
  with the commit latency instead of commits piling up, and no post waits for a timer: with
  200 workers each awaiting its previous post, a fixed window after the commit only added its
  length to every chunk's latency, since every post of the next batch arrived at once.
- ``settings.chunk_flush_ms`` is the least time between the starts of two flushes: it caps
  this replica's notifying commits for chunks (100/s at 10 ms) when flushes are quicker than
  that. A post to an idle relay is flushed at once.
- Each post awaits its flush: the worker's 200 means "stored and announced", which is what makes
  a later ``complete`` safe (its chunks are readable before the terminal status is).
- A post whose task the worker no longer holds (stale attempt, reverted, cancelled) gets
  LeaseLost carrying the current task; a database error fails every post of that batch (the
  worker retries; repeated (task, attempt, seq) are ignored by the append).
- ``stop()`` flushes what is buffered before returning; posts after stop are written directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import structlog

from inferq.db.chunks import AppendResult, ChunkIn, ChunkRepository
from inferq.db.tasks import TaskRepository
from inferq.errors import LeaseLost
from inferq.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Post:
    task_id: UUID
    chunks: list[ChunkIn]
    done: asyncio.Future[int]


class ChunkRelay:
    """One per replica; post() from any request handler, stop() on shutdown."""

    def __init__(self, chunks: ChunkRepository, tasks: TaskRepository, settings: Settings) -> None:
        self.chunks = chunks
        self.tasks = tasks
        self.flush_s = settings.chunk_flush_ms / 1000
        self._buffer: list[_Post] = []
        self._has_posts = asyncio.Event()
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False
        self._last_flush_at = -math.inf
        self.flushes = 0
        self.chunks_stored = 0

    @property
    def buffered(self) -> int:
        """Posts waiting for the next flush."""
        return len(self._buffer)

    async def post(
        self, task_id: UUID, session_id: UUID, attempt: int, chunks: Sequence[tuple[int, str]]
    ) -> int:
        """Queue (seq, data) chunks for the next flush; the task's last stored seq once it
        committed. Raises LeaseLost when ``session_id`` does not hold ``attempt``."""
        rows = [ChunkIn(task_id, session_id, attempt, seq, data) for seq, data in chunks]
        if not rows:
            return 0
        post = _Post(task_id, rows, asyncio.get_running_loop().create_future())
        if self._stopped:
            await self._write([post])
        else:
            self._ensure_flusher()
            self._buffer.append(post)
            self._has_posts.set()
        return await post.done

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="inferq-chunk-relay")

    async def stop(self) -> None:
        """Flush what is buffered and stop the flusher (posts after this are written directly)."""
        self._stopped = True
        self._stopping.set()
        self._has_posts.set()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            await flusher

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._has_posts.wait()
            delay = self._last_flush_at + self.flush_s - loop.time()
            if delay > 0 and not self._stopped:
                # stop() cuts the spacing short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            else:
                # One loop turn, so that posts made by handlers resumed together (a batch of
                # requests read at once) share this flush.
                await asyncio.sleep(0)
            batch, self._buffer = self._buffer, []
            self._has_posts.clear()
            if batch:
                self._last_flush_at = loop.time()
                # Awaited here: the next batch gathers while this one is written.
                await self._write(batch)
            if self._stopped and not self._buffer:
                return

    async def _write(self, batch: list[_Post]) -> None:
        rows = [row for post in batch for row in post.chunks]
        try:
            result = await self.chunks.append(rows)
        except Exception as exc:
            log.warning("chunk_flush_failed", posts=len(batch), chunks=len(rows), error=str(exc))
            for post in batch:
                if not post.done.done():
                    post.done.set_exception(exc)
            return
        self.flushes += 1
        self.chunks_stored += len(rows)
        await self._resolve(batch, result)

    async def _resolve(self, batch: list[_Post], result: AppendResult) -> None:
        refused = []
        for post in batch:
            if post.done.done():
                continue
            last_seq = result.last_seq.get((post.task_id, post.chunks[0].attempt))
            if last_seq is None:
                refused.append(post)
            else:
                post.done.set_result(last_seq)
        if not refused:
            return
        # Accepted posts are answered first: this read only words the refusals.
        try:
            current = {t.id: t for t in await self.tasks.get_many([p.task_id for p in refused])}
        except Exception as exc:
            log.warning("chunk_refusal_read_failed", posts=len(refused), error=str(exc))
            current = {}
        for post in refused:
            attempt = post.chunks[0].attempt
            task = current.get(post.task_id)
            state = f"; the task is {task.status} at attempt {task.attempt}" if task else ""
            if not post.done.done():
                post.done.set_exception(
                    LeaseLost(
                        f"task {post.task_id} is no longer held by this worker "
                        f"(attempt {attempt}{state})",
                        task=task,
                    )
                )
