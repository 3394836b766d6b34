"""ChunkRepository: token deltas in the UNLOGGED inferq.task_chunk table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import orjson
from psycopg import sql

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
# Only runs from the holder of the current attempt are stored. A repeated run is ignored and a
# longer run with the same first seq replaces the shorter one, so a worker may retry a post
# however it re-batches it; readers drop the overlaps (DISTINCT ON seq).
APPEND = """
WITH input AS (
    SELECT * FROM unnest(%(task_ids)b::uuid[], %(sessions)b::uuid[], %(attempts)b::int[],
                         %(firsts)b::int[], %(lasts)b::int[], %(data)b::text[])
        AS c(task_id, session_id, attempt, first_seq, last_seq, data)
), valid AS (
    SELECT DISTINCT c.task_id, c.attempt FROM input c
    JOIN inferq.task t ON t.id = c.task_id AND t.claimed_by = c.session_id
        AND t.attempt = c.attempt AND t.status IN ('claimed', 'running')
), ins AS (
    INSERT INTO inferq.task_chunk AS k (task_id, attempt, first_seq, last_seq, data)
    SELECT c.task_id, c.attempt, c.first_seq, c.last_seq, c.data
    FROM input c JOIN valid USING (task_id, attempt)
    ON CONFLICT (task_id, attempt, first_seq) DO UPDATE
        SET last_seq = excluded.last_seq, data = excluded.data
        WHERE excluded.last_seq > k.last_seq
)
SELECT v.task_id, v.attempt, max(c.last_seq) FROM valid v JOIN input c USING (task_id, attempt)
GROUP BY v.task_id, v.attempt
"""

# The chunks of one attempt after a seq, unpacked from their runs, in order, once each.
CHUNKS_AFTER = sql.SQL(
    """
SELECT DISTINCT ON (e.seq) e.seq, e.data
FROM inferq.task_chunk k
CROSS JOIN LATERAL (
    SELECT k.first_seq + x.n::int - 1 AS seq, x.elem::text AS data
    FROM json_array_elements(k.data::json) WITH ORDINALITY AS x(elem, n)
) e
WHERE k.task_id = {task_id} AND k.attempt = {attempt} AND k.last_seq > {after}
  AND e.seq > {after}
ORDER BY e.seq
LIMIT {limit}
"""
)

READ = CHUNKS_AFTER.format(
    task_id=sql.Placeholder("id"),
    attempt=sql.Placeholder("attempt"),
    after=sql.Placeholder("after"),
    limit=sql.Placeholder("limit"),
)

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


def consecutive_runs(chunks: Sequence[ChunkIn]) -> list[list[ChunkIn]]:
    """Group chunks, in the order given, into runs of one holder with consecutive seqs."""
    runs: list[list[ChunkIn]] = []
    for chunk in chunks:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and (last.task_id, last.session_id, last.attempt)
            == (chunk.task_id, chunk.session_id, chunk.attempt)
            and chunk.seq == last.seq + 1
        ):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


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
        runs = consecutive_runs(chunks)
        params = {
            "task_ids": [r[0].task_id for r in runs],
            "sessions": [r[0].session_id for r in runs],
            "attempts": [r[0].attempt for r in runs],
            "firsts": [r[0].seq for r in runs],
            "lasts": [r[-1].seq for r in runs],
            "data": ["[" + ",".join(c.data for c in r) + "]" for r in runs],
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
