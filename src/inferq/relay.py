"""ChunkRelay: buffers workers' chunk posts of all tasks and stores them once per flush window.

Design decisions:

- A notifying commit takes a cluster-wide lock, so chunks are never written one post at a time:
  every post of every task that arrives within ``settings.chunk_flush_ms`` of the first one goes
  into ONE ``ChunkRepository.append`` (one transaction, one CHUNK notification per payload).
- At most MAX_CONCURRENT_FLUSHES flushes are written at once; posts arriving meanwhile fill the
  next buffer, so under load the batch grows with the commit latency instead of commits piling
  up. The window is measured from the first post of a buffer, so a flush that took longer than
  the window is followed by the next one at once.
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
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import structlog

from inferq.db.chunks import AppendResult, ChunkIn, ChunkRepository
from inferq.db.pool import Pool
from inferq.db.tasks import TaskRepository
from inferq.errors import LeaseLost
from inferq.settings import Settings

log = structlog.get_logger(__name__)

# Flushes written at once. A second transaction inserts while the first waits for its commit;
# one task's posts are never split across them unsafely, because a reader delivers only the
# contiguous run of seqs and waits for the next notification at a gap.
MAX_CONCURRENT_FLUSHES = 1


@dataclass(slots=True)
class _Post:
    task_id: UUID
    chunks: list[ChunkIn]
    done: asyncio.Future[int]


class ChunkRelay:
    """One per replica; post() from any request handler, stop() on shutdown."""

    def __init__(self, pool: Pool, settings: Settings) -> None:
        self.chunks = ChunkRepository(pool)
        self.tasks = TaskRepository(pool)
        self.flush_s = settings.chunk_flush_ms / 1000
        self._buffer: list[_Post] = []
        self._has_posts = asyncio.Event()
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False
        self._first_post_at = 0.0
        self._writes = asyncio.Semaphore(MAX_CONCURRENT_FLUSHES)
        self._in_flight: set[asyncio.Task[None]] = set()
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
            if not self._buffer:
                self._first_post_at = asyncio.get_running_loop().time()
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
        if self._in_flight:
            await asyncio.gather(*self._in_flight)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._has_posts.wait()
            # The window starts at the first buffered post, which may have arrived while the
            # previous flush was being written: everything within it shares one commit.
            delay = self._first_post_at + self.flush_s - loop.time()
            if delay > 0 and not self._stopped:
                # stop() cuts the window short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            await self._writes.acquire()
            batch, self._buffer = self._buffer, []
            self._has_posts.clear()
            if batch:
                task = asyncio.create_task(self._write_and_release(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            else:
                self._writes.release()
            if self._stopped and not self._buffer:
                return

    async def _write_and_release(self, batch: list[_Post]) -> None:
        try:
            await self._write(batch)
        finally:
            self._writes.release()

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
        current = {}
        if result.rejected:
            rejected_ids = list({task_id for task_id, _ in result.rejected})
            current = {t.id: t for t in await self.tasks.get_many(rejected_ids)}
        for post in batch:
            if post.done.done():
                continue
            attempt = post.chunks[0].attempt if post.chunks else 0
            if (post.task_id, attempt) in result.last_seq:
                post.done.set_result(result.last_seq[post.task_id, attempt])
                continue
            task = current.get(post.task_id)
            state = f"; the task is {task.status} at attempt {task.attempt}" if task else ""
            post.done.set_exception(
                LeaseLost(
                    f"task {post.task_id} is no longer held by this worker "
                    f"(attempt {attempt}{state})",
                    task=task,
                )
            )
