"""ChunkStream: a task's stream chunks, numbered and posted in order in small batches.

A handler emits chunks without waiting; one flusher per task posts whatever accumulated while
the previous post was in flight, so there is never more than one post per task on the wire
(order preserved) and a fast producer is not slowed down to one round trip per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from inferq.wire import JsonValue

Send = Callable[[Sequence[tuple[int, JsonValue]]], Awaitable[int]]


class ChunkStream:
    """Numbers chunks 1, 2, 3 ... and posts them with ``send`` from :meth:`run`."""

    def __init__(self, send: Send, *, max_batch: int = 512) -> None:
        self._send = send
        self._max_batch = max_batch
        self._pending: list[tuple[int, JsonValue]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.seq = 0  # the last seq handed out
        self.posted_seq = 0  # the last seq the daemon acknowledged
        self.posts = 0

    def emit(self, data: JsonValue) -> int:
        """Queue one chunk for the next post; returns its seq. Never blocks."""
        if self._closed:
            raise RuntimeError("the stream is closed: the handler already returned")
        self.seq += 1
        self._pending.append((self.seq, data))
        self._wake.set()
        return self.seq

    def close(self) -> None:
        """No more chunks: :meth:`run` returns once everything queued is posted."""
        self._closed = True
        self._wake.set()

    async def run(self, gate: Awaitable[object] | None = None) -> None:
        """Post queued chunks until closed and empty; raises what ``send`` raises.

        ``gate`` (the task's start call) is awaited before the first post, so chunks never
        reach the daemon before the task is running. It is shielded: the runner awaits the
        same call before posting the outcome, so cancelling this loop (the handler failed
        early) must not cancel the start.
        """
        if gate is not None:
            await asyncio.shield(gate)
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self.posted_seq = await self._send(batch)
            self.posts += 1
