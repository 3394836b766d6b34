"""BatchRepository: batches, the tasks of their lines, and their finalization.

Every change of a batch's status is one guarded statement (``WHERE status = <expected>``), or a
transaction that ends with one: a sweep run twice, or by two replicas around a leadership
handover, changes nothing the second time. The two big steps are single transactions:
``start`` inserts every line's task and moves the batch to ``in_progress``, or nothing at all;
``finalize`` writes the output and error files and ends the batch, or nothing at all — a
replica killed midway leaves no task, no half file, and the next sweep does it again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

import orjson
from psycopg import AsyncConnection, sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from inferq.db.errors import connect
from inferq.db.files import new_id
from inferq.db.pool import Pool
from inferq.db.rows import render
from inferq.domain.batch import Batch, Counts, Line
from inferq.errors import BatchNotFound, InvalidTransition

_COLUMNS = sql.SQL(", ").join(sql.Identifier(f.name) for f in fields(Batch))


def _q(text: str, **parts: sql.Composable) -> str:
    """A query with the batch's columns as {cols}, composed once at import."""
    return render(sql.SQL(text).format(cols=_COLUMNS, **parts))


CREATE = _q(
    """
INSERT INTO inferq.batch (id, owner_id, endpoint, input_file_id, completion_window, metadata,
                          expires_at)
VALUES (%(id)s, %(owner)s, %(endpoint)s, %(input)s, %(window)s, %(metadata)s,
        now() + make_interval(secs => %(window_s)s))
RETURNING {cols}
"""
)

GET = _q("SELECT {cols} FROM inferq.batch WHERE id = %(id)s AND owner_id = %(owner)s")

LIST = _q(
    """
SELECT {cols} FROM inferq.batch
WHERE owner_id = %(owner)s
  AND (%(after)s::text IS NULL OR (created_at, id) < (
        SELECT created_at, id FROM inferq.batch WHERE id = %(after)s AND owner_id = %(owner)s))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""
)

OPEN = _q(
    """
SELECT {cols} FROM inferq.batch
WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
ORDER BY created_at LIMIT %(limit)s
"""
)

COUNTS = """
SELECT batch_id,
       count(*) FILTER (WHERE status = 'completed'),
       count(*) FILTER (WHERE status IN ('error', 'cancelled'))
FROM inferq.task WHERE batch_id = ANY(%(ids)s) GROUP BY batch_id
"""

UNFINISHED = """
SELECT count(*) FROM inferq.task
WHERE batch_id = %(id)s AND status = ANY(%(statuses)s::inferq.task_status[])
"""

CANCEL = _q(
    """
UPDATE inferq.batch SET status = 'cancelling', cancelling_at = now()
WHERE id = %(id)s AND owner_id = %(owner)s AND status IN ('validating', 'in_progress')
RETURNING {cols}
"""
)

_MOVE = """
UPDATE inferq.batch SET status = %(to)s, {stamp} = now()
WHERE id = %(id)s AND status = %(from)s
RETURNING {cols}
"""

FAIL = _q(
    """
UPDATE inferq.batch SET status = 'failed', failed_at = now(), errors = %(errors)s
WHERE id = %(id)s AND status = 'validating'
RETURNING {cols}
"""
)

# Lines are inserted in input order; created_at (clock_timestamp) keeps that order.
INSERT_LINES = """
INSERT INTO inferq.task (pool_name, llm_name, model, tier, request_body, owner_id,
                         max_attempts, batch_id, custom_id, lane)
SELECT l.pool, l.llm, l.model, l.tier, l.body, %(owner)s, %(max_attempts)s, %(batch)s, l.custom,
       'batch'
FROM jsonb_to_recordset(%(lines)s::jsonb)
    AS l(pool text, llm text, model text, tier text, body jsonb, custom text)
"""

STARTED = _q(
    """
UPDATE inferq.batch SET status = 'in_progress', in_progress_at = now(), total = %(total)s
WHERE id = %(id)s AND status = 'validating'
RETURNING {cols}
"""
)

STOP_LINES = """
UPDATE inferq.task SET status = 'cancelled', error_message = %(reason)s, lease_expires_at = NULL
WHERE batch_id = %(id)s AND status = ANY(%(statuses)s::inferq.task_status[])
"""

# The lines' outcomes in input order, a page at a time (keyset on created_at, id).
RESULTS = """
SELECT t.id, t.custom_id, t.status::text, t.response_body, t.error_message, t.created_at
FROM inferq.task t
WHERE t.batch_id = %(id)s AND (t.created_at, t.id) > (%(after_ts)s, %(after_id)s)
ORDER BY t.created_at, t.id
LIMIT %(page)s
"""

NEW_FILE = """
INSERT INTO inferq.file (id, owner_id, purpose, filename, bytes, lines, status)
VALUES (%(id)s, %(owner)s, 'batch_output', %(filename)s, %(bytes)s, %(lines)s, 'processed')
"""

PART = "INSERT INTO inferq.file_part (file_id, n, data) VALUES (%(id)s, %(n)s, %(data)s)"

_ENDED = """
UPDATE inferq.batch SET status = %(to)s, {stamp} = now(),
    output_file_id = %(output)s, error_file_id = %(error)s
WHERE id = %(id)s AND status = %(from)s
RETURNING {cols}
"""

_STAMPS = {
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}
MOVE = {new: _q(_MOVE, stamp=sql.Identifier(col)) for new, col in _STAMPS.items()}
ENDED = {new: _q(_ENDED, stamp=sql.Identifier(col)) for new, col in _STAMPS.items()}

PART_BYTES = 1 << 20
RESULT_PAGE = 1000


class BatchRepository:
    """Batches over a pool of autocommit connections."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def create(
        self,
        owner_id: str,
        endpoint: str,
        input_file_id: str,
        window: str,
        window_s: float,
        metadata: dict[str, Any] | None,
    ) -> Batch:
        params = {
            "id": new_id("batch_"),
            "owner": owner_id,
            "endpoint": endpoint,
            "input": input_file_id,
            "window": window,
            "window_s": window_s,
            "metadata": Jsonb(metadata) if metadata is not None else None,
        }
        batch = await self._one(CREATE, params)
        assert batch is not None
        return batch

    async def get(self, batch_id: str, owner_id: str) -> Batch:
        """The owner's batch; raises BatchNotFound (also for another owner's)."""
        batch = await self._one(GET, {"id": batch_id, "owner": owner_id})
        if batch is None:
            raise BatchNotFound(f"batch {batch_id!r} not found")
        return batch

    async def list_batches(self, owner_id: str, *, after: str | None, limit: int) -> list[Batch]:
        return await self._all(LIST, {"owner": owner_id, "after": after, "limit": limit})

    async def open(self, limit: int = 100) -> list[Batch]:
        """Batches a sweep has work for, oldest first."""
        return await self._all(OPEN, {"limit": limit})

    async def counts(self, batches: Sequence[Batch]) -> dict[str, Counts]:
        """Live request counts of ``batches``, in one statement."""
        ids = [b.id for b in batches]
        async with connect(self.pool) as conn:
            cur = await conn.execute(COUNTS, {"ids": ids})
            rows = {r[0]: (int(r[1]), int(r[2])) for r in await cur.fetchall()}
        return {b.id: Counts(b.total, *rows.get(b.id, (0, 0))) for b in batches}

    async def unfinished(self, batch_id: str, statuses: Sequence[str]) -> int:
        async with connect(self.pool) as conn:
            cur = await conn.execute(UNFINISHED, {"id": batch_id, "statuses": list(statuses)})
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def cancel(self, batch_id: str, owner_id: str) -> Batch:
        """validating|in_progress -> cancelling; a repeat returns the batch as it is. Raises
        BatchNotFound, InvalidTransition for a batch that already ended otherwise."""
        batch = await self._one(CANCEL, {"id": batch_id, "owner": owner_id})
        if batch is not None:
            return batch
        current = await self.get(batch_id, owner_id)
        if current.status in ("cancelling", "cancelled"):
            return current
        raise InvalidTransition(f"batch {batch_id} is {current.status}; it cannot be cancelled")

    async def move(self, batch_id: str, old: str, new: str) -> Batch | None:
        """``old`` -> ``new`` (stamping ``<new>_at``); None when the batch was not ``old``."""
        query = MOVE[new]
        return await self._one(query, {"id": batch_id, "from": old, "to": new})

    async def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> Batch | None:
        """validating -> failed with OpenAI's ``errors`` list; None when not validating."""
        body = {"object": "list", "data": errors}
        return await self._one(FAIL, {"id": batch_id, "errors": Jsonb(body)})

    async def start(
        self, batch: Batch, pages: AsyncIterator[list[Line]], max_attempts: int
    ) -> Batch | None:
        """Insert a task per line (``pages`` of them, so memory holds one page) and move the
        batch to in_progress, in one transaction; None (and no task) when the batch was no
        longer validating."""
        try:
            return await self._start(batch, pages, max_attempts)
        except _Rollback:
            return None

    async def _start(
        self, batch: Batch, pages: AsyncIterator[list[Line]], max_attempts: int
    ) -> Batch:
        total = 0
        async with connect(self.pool) as conn, conn.transaction():
            async for lines in pages:
                page = [
                    {"pool": ln.pool_name, "llm": ln.llm_name, "model": ln.model,
                     "tier": ln.tier, "body": ln.body, "custom": ln.custom_id}
                    for ln in lines
                ]  # fmt: skip
                await conn.execute(
                    INSERT_LINES,
                    {"owner": batch.owner_id, "max_attempts": max_attempts, "batch": batch.id,
                     "lines": orjson.dumps(page).decode()},
                )  # fmt: skip
                total += len(page)
            cur = conn.cursor(row_factory=class_row(Batch))
            await cur.execute(STARTED, {"id": batch.id, "total": total})
            started: Batch | None = await cur.fetchone()
            if started is None:
                raise _Rollback()
        return started

    async def stop_lines(self, batch_id: str, statuses: Sequence[str], reason: str) -> int:
        """Cancel the batch's tasks in ``statuses``; how many."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(
                STOP_LINES, {"id": batch_id, "statuses": list(statuses), "reason": reason}
            )
            return cur.rowcount

    async def finalize(self, batch: Batch, old: str, new: str) -> Batch | None:
        """Write the output and error files from the lines' outcomes and move the batch from
        ``old`` to ``new``, in one transaction; None (nothing written) when it was not ``old``."""
        try:
            return await self._finalize(batch, old, new)
        except _Rollback:
            return None

    async def _finalize(self, batch: Batch, old: str, new: str) -> Batch:
        async with connect(self.pool) as conn, conn.transaction():
            output = _FileWriter(conn, batch, "output")
            errors = _FileWriter(conn, batch, "error")
            after_ts = datetime.min.replace(tzinfo=batch.created_at.tzinfo)
            after_id: Any = "00000000-0000-0000-0000-000000000000"
            while True:
                cur = await conn.execute(
                    RESULTS,
                    {"id": batch.id, "after_ts": after_ts, "after_id": after_id,
                     "page": RESULT_PAGE},
                )  # fmt: skip
                rows = await cur.fetchall()
                for task_id, custom_id, status, response, message, created_at in rows:
                    line, ok = result_line(task_id, custom_id, status, response, message, new)
                    await (output if ok else errors).add(line)
                    after_ts, after_id = created_at, task_id
                if len(rows) < RESULT_PAGE:
                    break
            output_id = await output.close()
            error_id = await errors.close()
            ending = conn.cursor(row_factory=class_row(Batch))
            await ending.execute(
                ENDED[new],
                {"id": batch.id, "from": old, "to": new, "output": output_id, "error": error_id},
            )
            ended: Batch | None = await ending.fetchone()
            if ended is None:
                raise _Rollback()
        return ended

    async def _one(self, query: str, params: dict[str, Any]) -> Batch | None:
        rows = await self._all(query, params)
        return rows[0] if rows else None

    async def _all(self, query: str, params: dict[str, Any]) -> list[Batch]:
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(Batch))
            await cur.execute(query, params)
            return await cur.fetchall()


class _Rollback(Exception):
    """Raised inside a transaction block to undo it (the guarded status change matched no
    row: another sweep got there first); caught by the public method."""


def result_line(
    task_id: Any, custom_id: str, status: str, response: Any, message: str | None, ending: str
) -> tuple[bytes, bool]:
    """One line of the output (True) or the error file (False), in OpenAI's format."""
    request_id = str(task_id)
    line_id = "batch_req_" + request_id.replace("-", "")
    if status == "completed":
        body = {"status_code": 200, "request_id": request_id, "body": response}
        return orjson.dumps({"id": line_id, "custom_id": custom_id, "response": body,
                             "error": None}) + b"\n", True  # fmt: skip
    if status == "error":
        error = {"message": message or "the request failed", "type": "server_error",
                 "code": "task_failed"}  # fmt: skip
        body = {"status_code": 500, "request_id": request_id, "body": {"error": error}}
        return orjson.dumps({"id": line_id, "custom_id": custom_id, "response": body,
                             "error": None}) + b"\n", False  # fmt: skip
    code = "batch_expired" if ending == "expired" else "batch_cancelled"
    why = (
        "the batch's completion window ended before this request ran"
        if ending == "expired"
        else "the batch was cancelled before this request ran"
    )
    return orjson.dumps({"id": line_id, "custom_id": custom_id, "response": None,
                         "error": {"code": code, "message": why}}) + b"\n", False  # fmt: skip


class _FileWriter:
    """Accumulates lines into parts of PART_BYTES and stores them as a batch_output file."""

    def __init__(self, conn: AsyncConnection[Any], batch: Batch, kind: str) -> None:
        self.conn = conn
        self.batch = batch
        self.kind = kind
        self.id = new_id("file-")
        self.buffer = bytearray()
        self.parts = 0
        self.size = 0
        self.lines = 0

    async def add(self, line: bytes) -> None:
        self.buffer += line
        self.size += len(line)
        self.lines += 1
        if len(self.buffer) >= PART_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self.parts == 0:
            await self.conn.execute(
                NEW_FILE,
                {"id": self.id, "owner": self.batch.owner_id, "bytes": 0, "lines": 0,
                 "filename": f"{self.batch.id}_{self.kind}.jsonl"},
            )  # fmt: skip
        await self.conn.execute(PART, {"id": self.id, "n": self.parts, "data": bytes(self.buffer)})
        self.parts += 1
        self.buffer.clear()

    async def close(self) -> str | None:
        """The file's id, or None when it got no line."""
        if self.lines == 0:
            return None
        if self.buffer:
            await self._flush()
        await self.conn.execute(
            "UPDATE inferq.file SET bytes = %(bytes)s, lines = %(lines)s WHERE id = %(id)s",
            {"id": self.id, "bytes": self.size, "lines": self.lines},
        )
        return self.id
