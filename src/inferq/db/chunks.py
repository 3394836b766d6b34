"""ChunkRepository: token deltas in the UNLOGGED inferq.task_chunk table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from inferq.db import channels
from inferq.db.errors import connect
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


# The most chunks one row holds. Bounding a run is what lets a reader find its next chunk by
# an index range instead of scanning every row of the attempt: a row holding seq s starts
# after s - MAX_RUN, so "the rows after seq n" are the rows with first_seq > n - MAX_RUN.
# Rows stored by earlier versions (and by old replicas during a rolling upgrade) may be longer;
# the read also takes the one row that starts just before that range (see _ROWS_AFTER).
MAX_RUN = 8

# Tasks per CHUNK notification: an item is at most ~70 bytes ("uuid", two int4s, separators),
# so a payload stays below channels.MAX_PAYLOAD_BYTES.
TASKS_PER_PAYLOAD = channels.MAX_PAYLOAD_BYTES // 70

# One statement, so one round trip in autocommit: store the runs, notify, report.
# Arrays go in binary (%(x)b): the text format escapes every quote of every JSON chunk in
# Python, ~40x slower for a flush of 1,600 chunks.
# Only runs from the holder of the current attempt are stored. A repeated run is ignored and a
# longer run with the same first seq replaces the shorter one, so a worker may retry a post
# however it re-batches it; readers drop the overlaps.
# The notification lists the accepted (task, attempt, last seq) triples, TASKS_PER_PAYLOAD per
# payload; it is built and sent by the statement itself (the scalar subquery runs it once) and
# delivered when the statement commits, after the rows are visible.
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
), stored AS (
    SELECT v.task_id, v.attempt, max(c.last_seq) AS last_seq
    FROM valid v JOIN input c USING (task_id, attempt)
    GROUP BY v.task_id, v.attempt
), notified AS (
    SELECT pg_notify(%(channel)s, json_agg(json_build_array(task_id, attempt, last_seq))::text)
    FROM (SELECT *, (row_number() OVER () - 1) / %(per_payload)s AS page FROM stored) s
    GROUP BY page
)
SELECT task_id, attempt, last_seq, (SELECT count(*) FROM notified) FROM stored
"""

# The rows of one attempt that may hold chunks in (after, after + page]: those of the primary
# key range first_seq in (after - MAX_RUN, after + page], all of them (a retried post may have
# stored overlapping rows, so there can be more than ``page``), plus the last row that starts
# before that range when it reaches past ``after``: a longer row stored by an earlier version.
# Each branch is fenced (OFFSET 0, LIMIT 1) so that the planner keeps it a parameterized index
# scan per reader (flattened, it may hash-join a scan of the whole table); the backward branch
# reads one index entry, and its last_seq is checked after the LIMIT, not while scanning.
# ``after`` is bigint so that after + page cannot overflow.
_ROWS_AFTER = """
(SELECT k.first_seq, k.data FROM inferq.task_chunk k
 WHERE k.task_id = {task_id} AND k.attempt = {attempt}
   AND k.first_seq > {after} - {max_run} AND k.first_seq <= {after} + {page}
   AND k.last_seq > {after}
 OFFSET 0)
UNION ALL
(SELECT b.first_seq, b.data FROM (
    SELECT k.first_seq, k.last_seq, k.data FROM inferq.task_chunk k
    WHERE k.task_id = {task_id} AND k.attempt = {attempt} AND k.first_seq <= {after} - {max_run}
    ORDER BY k.first_seq DESC LIMIT 1
 ) b WHERE b.last_seq > {after})
"""

# The chunks of many (task, attempt, after) keys with seq in (after, after + page], unpacked
# from their runs, ordered by key (its 1-based position ``i``) then seq. Overlapping runs of a
# retried post may repeat a seq: the caller drops repeats. json (not jsonb) elements keep the
# exact text the worker posted.
READ_MANY = """
SELECT r.i, k.first_seq + x.n::int - 1 AS seq, x.elem::text
FROM unnest(%(ids)b::uuid[], %(attempts)b::int[], %(afters)b::int8[])
     WITH ORDINALITY AS r(task_id, attempt, after_seq, i)
CROSS JOIN LATERAL ({rows}) k
CROSS JOIN LATERAL json_array_elements(k.data::json) WITH ORDINALITY AS x(elem, n)
WHERE k.first_seq + x.n::int - 1 BETWEEN r.after_seq + 1 AND r.after_seq + %(page)s
ORDER BY r.i, seq
""".replace(
    "{rows}",
    _ROWS_AFTER.format(
        task_id="r.task_id",
        attempt="r.attempt",
        after="r.after_seq",
        max_run=MAX_RUN,
        page="%(page)s",
    ),
)

ChunkKey = tuple[UUID, int, int]  # task id, attempt, after seq

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


def consecutive_runs(chunks: Sequence[ChunkIn]) -> list[list[ChunkIn]]:
    """Group chunks, in the order given, into runs of one holder with consecutive seqs, at
    most MAX_RUN chunks each."""
    runs: list[list[ChunkIn]] = []
    for chunk in chunks:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and chunk.seq == last.seq + 1
            and chunk.task_id == last.task_id
            and chunk.attempt == last.attempt
            and chunk.session_id == last.session_id
            and len(runs[-1]) < MAX_RUN
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
        """Store a batch in one statement (one transaction, one round trip) that also
        notifies CHUNK, once per TASKS_PER_PAYLOAD tasks whose chunks were accepted."""
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
            "channel": channels.CHUNK,
            "per_payload": TASKS_PER_PAYLOAD,
        }
        async with connect(self.pool) as conn:
            cur = await conn.execute(APPEND, params)
            accepted = {(r[0], r[1]): r[2] for r in await cur.fetchall()}
        posted = {(c.task_id, c.attempt) for c in chunks}
        return AppendResult(accepted, posted - accepted.keys())

    async def read(
        self, task_id: UUID, attempt: int, after_seq: int = 0, limit: int = 1000
    ) -> list[Chunk]:
        """Chunks of one attempt with seq in (after_seq, after_seq + limit], in order, once
        each (may have gaps in flight)."""
        pages = await self.read_many([(task_id, attempt, after_seq)], page=limit)
        return [Chunk(seq, data) for seq, data in pages.get(0, [])]

    async def read_many(
        self, keys: Sequence[ChunkKey], *, page: int
    ) -> dict[int, list[tuple[int, str]]]:
        """For each (task id, attempt, after seq) key, by its index in ``keys``: the stored
        (seq, data) with seq in (after, after + page], in order, once each, gaps left as they
        are. Keys with nothing stored are left out. One statement for all keys."""
        params = {
            "ids": [k[0] for k in keys],
            "attempts": [k[1] for k in keys],
            "afters": [k[2] for k in keys],
            "page": page,
        }
        async with connect(self.pool) as conn:
            cur = await conn.execute(READ_MANY, params)
            rows = await cur.fetchall()
        found: dict[int, list[tuple[int, str]]] = {}
        last: tuple[int, int] | None = None
        for i, seq, data in rows:
            # Rows come ordered by key then seq; a repeat (overlapping retried runs) is dropped.
            if (i, seq) != last:
                found.setdefault(i - 1, []).append((seq, data))
                last = (i, seq)
        return found

    async def gc(self, *, retention_s: float, now: datetime | None = None) -> int:
        """Delete chunks nobody can read any more; returns how many."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(GC, {"now": now, "retention_s": retention_s})
            return cur.rowcount
