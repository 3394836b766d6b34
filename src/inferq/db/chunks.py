"""ChunkRepository: token deltas in the UNLOGGED inferq.task_chunk table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import orjson

from inferq.db import channels
from inferq.db.pool import Pool


@dataclass(frozen=True, slots=True)
class ChunkIn:
    """One delta posted by the worker that holds ``attempt`` of the task."""

    task_id: UUID
    session_id: UUID
    attempt: int
    seq: int
    data: str  # one compact JSON document


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    data: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    # Keyed by (task id, attempt): a stale post and a live one of the same task may share a flush.
    last_seq: dict[tuple[UUID, int], int]  # accepted: the highest seq stored so far
    rejected: set[tuple[UUID, int]]  # refused: that session no longer holds that attempt


# Arrays go in binary (%(x)b): the text format escapes every quote of every JSON chunk in
# Python, ~40x slower for a flush of 1,600 chunks.
# Only chunks from the holder of the current attempt are stored; a repeated (task, attempt,
# seq) is ignored, so a worker may retry a post safely.
APPEND = """
WITH input AS (
    SELECT * FROM unnest(%(task_ids)b::uuid[], %(sessions)b::uuid[], %(attempts)b::int[],
                         %(seqs)b::int[], %(data)b::text[])
        AS c(task_id, session_id, attempt, seq, data)
), valid AS (
    SELECT DISTINCT c.task_id, c.attempt FROM input c
    JOIN inferq.task t ON t.id = c.task_id AND t.claimed_by = c.session_id
        AND t.attempt = c.attempt AND t.status IN ('claimed', 'running')
), ins AS (
    INSERT INTO inferq.task_chunk (task_id, attempt, seq, data)
    SELECT c.task_id, c.attempt, c.seq, c.data FROM input c JOIN valid USING (task_id, attempt)
    ON CONFLICT DO NOTHING
)
SELECT v.task_id, v.attempt, max(c.seq) FROM valid v JOIN input c USING (task_id, attempt)
GROUP BY v.task_id, v.attempt
"""

READ = """
SELECT seq, data FROM inferq.task_chunk
WHERE task_id = %(id)s AND attempt = %(attempt)s AND seq > %(after)s
ORDER BY seq LIMIT %(limit)s
"""

# Chunks of terminal tasks past the retention, of earlier attempts, and of deleted tasks.
GC = """
DELETE FROM inferq.task_chunk c
WHERE NOT EXISTS (
    SELECT 1 FROM inferq.task t
    WHERE t.id = c.task_id AND t.attempt = c.attempt
      AND (t.completed_at IS NULL
           OR t.completed_at >= coalesce(%(now)s::timestamptz, now())
                                - make_interval(secs => %(retention_s)s))
)
"""


def notification_payloads(last_seq: dict[tuple[UUID, int], int]) -> list[str]:
    """Split ``[task_id, attempt, last_seq]`` triples into payloads below the size limit."""
    payloads: list[str] = []
    items: list[bytes] = []
    size = 2
    for (task_id, attempt), seq in last_seq.items():
        item = orjson.dumps([str(task_id), attempt, seq])
        if items and size + len(item) + 1 > channels.MAX_PAYLOAD_BYTES:
            payloads.append("[" + b",".join(items).decode() + "]")
            items, size = [], 2
        items.append(item)
        size += len(item) + 1
    if items:
        payloads.append("[" + b",".join(items).decode() + "]")
    return payloads


class ChunkRepository:
    """Appends and reads token deltas."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def append(self, chunks: Sequence[ChunkIn]) -> AppendResult:
        """Store a batch in one transaction that also notifies CHUNK once per payload.

        The notification is only sent for tasks whose chunks were accepted.
        """
        if not chunks:
            return AppendResult({}, set())
        params = {
            "task_ids": [c.task_id for c in chunks],
            "sessions": [c.session_id for c in chunks],
            "attempts": [c.attempt for c in chunks],
            "seqs": [c.seq for c in chunks],
            "data": [c.data for c in chunks],
        }
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(APPEND, params)
            rows = await cur.fetchall()
            accepted = {(r[0], r[1]): r[2] for r in rows}
            for payload in notification_payloads(accepted):
                await conn.execute("SELECT pg_notify(%s, %s)", (channels.CHUNK, payload))
        posted = {(c.task_id, c.attempt) for c in chunks}
        return AppendResult(accepted, posted - accepted.keys())

    async def read(
        self, task_id: UUID, attempt: int, after_seq: int = 0, limit: int = 1000
    ) -> list[Chunk]:
        """Chunks of one attempt with seq > after_seq, in order (may have gaps in flight)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                READ, {"id": task_id, "attempt": attempt, "after": after_seq, "limit": limit}
            )
            return [Chunk(seq, data) for seq, data in await cur.fetchall()]

    async def gc(self, *, retention_s: float, now: datetime | None = None) -> int:
        """Delete chunks nobody can read any more; returns how many."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(GC, {"now": now, "retention_s": retention_s})
            return cur.rowcount
