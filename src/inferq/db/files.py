"""FileRepository: OpenAI-style files in inferq.file, their content in parts (inferq.file_part).

A file is written part by part, each part its own short statement, while it streams in; it
becomes visible (``processed``) only with the last statement of the upload. A file left
``uploading`` (its replica died) is never listed or read, and ``gc_uploads`` removes it.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import class_row

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.db.rows import render
from inferq.domain.batch import StoredFile
from inferq.errors import FileNotFound

_ALPHABET = string.ascii_letters + string.digits

_COLUMNS = sql.SQL(", ").join(
    sql.Identifier(c)
    for c in ("id", "owner_id", "purpose", "filename", "bytes", "lines", "status", "created_at")
)


def _q(text: str, **parts: sql.Composable) -> str:
    """A query with the file's columns as {cols}, composed once at import."""
    return render(sql.SQL(text).format(cols=_COLUMNS, **parts))


CREATE = _q(
    """
INSERT INTO inferq.file (id, owner_id, purpose, filename)
VALUES (%(id)s, %(owner)s, %(purpose)s, %(filename)s)
RETURNING {cols}
"""
)

PART = "INSERT INTO inferq.file_part (file_id, n, data) VALUES (%(id)s, %(n)s, %(data)s)"

FINISH = _q(
    """
UPDATE inferq.file SET status = 'processed', bytes = %(bytes)s, lines = %(lines)s
WHERE id = %(id)s AND status = 'uploading'
RETURNING {cols}
"""
)

GET = _q(
    """
SELECT {cols} FROM inferq.file
WHERE id = %(id)s AND owner_id = %(owner)s AND status = 'processed'
"""
)

_LIST = """
SELECT {cols} FROM inferq.file f
WHERE owner_id = %(owner)s AND status = 'processed'
  AND (%(purpose)s::text IS NULL OR purpose = %(purpose)s)
  AND (%(after)s::text IS NULL OR (created_at, id) {cmp} (
        SELECT created_at, id FROM inferq.file WHERE id = %(after)s AND owner_id = %(owner)s))
ORDER BY created_at {order}, id {order}
LIMIT %(limit)s
"""

LIST = {
    ascending: _q(
        _LIST,
        cmp=sql.SQL(">" if ascending else "<"),
        order=sql.SQL("ASC" if ascending else "DESC"),
    )
    for ascending in (True, False)
}

PARTS = """
SELECT data FROM inferq.file_part WHERE file_id = %(id)s AND n >= %(from)s
ORDER BY n LIMIT %(count)s
"""

DELETE = "DELETE FROM inferq.file WHERE id = %(id)s AND owner_id = %(owner)s"

GC_UPLOADS = """
DELETE FROM inferq.file
WHERE status = 'uploading'
  AND created_at < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(age_s)s)
"""


def new_id(prefix: str) -> str:
    """An id like OpenAI's: a prefix and 24 random letters and digits."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class FileRepository:
    """Files and their parts over a pool of autocommit connections."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def create(self, owner_id: str, purpose: str, filename: str) -> StoredFile:
        """A new file, ``uploading`` (invisible) until ``finish``."""
        params = {
            "id": new_id("file-"),
            "owner": owner_id,
            "purpose": purpose,
            "filename": filename,
        }
        return await self._one(CREATE, params)

    async def append(self, file_id: str, n: int, data: bytes) -> None:
        """Store part ``n`` of an uploading file."""
        async with connect(self.pool) as conn:
            await conn.execute(PART, {"id": file_id, "n": n, "data": data})

    async def finish(self, file_id: str, size: int, lines: int) -> StoredFile:
        """Make the upload visible, with its size and line count."""
        return await self._one(FINISH, {"id": file_id, "bytes": size, "lines": lines})

    async def get(self, file_id: str, owner_id: str) -> StoredFile:
        """The owner's visible file; raises FileNotFound (also for another owner's)."""
        return await self._one(GET, {"id": file_id, "owner": owner_id})

    async def list_files(
        self,
        owner_id: str,
        *,
        purpose: str | None,
        after: str | None,
        limit: int,
        ascending: bool,
    ) -> list[StoredFile]:
        """The owner's visible files by creation time, after the file ``after``."""
        query = LIST[ascending]
        params = {"owner": owner_id, "purpose": purpose, "after": after, "limit": limit}
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(StoredFile))
            await cur.execute(query, params)
            return await cur.fetchall()

    async def content(self, file_id: str, *, page: int = 8) -> AsyncIterator[bytes]:
        """The file's parts in order, ``page`` parts per statement (memory stays bounded by a
        page whatever the file's size). The caller checked the file is visible."""
        n = 0
        while True:
            async with connect(self.pool) as conn:
                cur = await conn.execute(PARTS, {"id": file_id, "from": n, "count": page})
                rows = await cur.fetchall()
            for (data,) in rows:
                yield bytes(data)
            if len(rows) < page:
                return
            n += page

    async def delete(self, file_id: str, owner_id: str) -> bool:
        """Delete the owner's file and its parts; whether there was one."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(DELETE, {"id": file_id, "owner": owner_id})
            return cur.rowcount > 0

    async def gc_uploads(self, age_s: float, now: datetime | None = None) -> int:
        """Delete uploads abandoned for longer than ``age_s``; how many."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(GC_UPLOADS, {"age_s": age_s, "now": now})
            return cur.rowcount

    async def _one(self, query: str, params: dict[str, Any]) -> StoredFile:
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(StoredFile))
            await cur.execute(query, params)
            found = await cur.fetchone()
        if found is None:
            raise FileNotFound(f"file {params.get('id')!r} not found")
        return found
