"""Row factories that turn inferq.task rows into domain Tasks, and the listing cursors."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from psycopg import sql
from psycopg.rows import BaseRowFactory, RowMaker

from inferq.domain.task import TASK_COLUMNS, Task, TaskStatus

# The column list every task query returns, in Task's field order.
TASK_SELECT = sql.SQL(", ").join(sql.Identifier("t", c) for c in TASK_COLUMNS)


def render(query: sql.Composable) -> str:
    """The query as text, composed once at import: psycopg would otherwise re-render a
    ``sql.Composed`` (~30 us) on every execute. Only constant identifiers go in here."""
    return query.as_string()


def task_row(cursor: Any) -> RowMaker[Task]:
    """Build a Task from a row whose first columns are TASK_SELECT."""
    width = len(TASK_COLUMNS)

    def make(values: Sequence[Any]) -> Task:
        fields = dict(zip(TASK_COLUMNS, values[:width], strict=True))
        fields["status"] = TaskStatus(fields["status"])
        return Task(**fields)

    return make


task_row_factory: BaseRowFactory[Task] = task_row


# Listing cursors: (created_at, id) of the last task of a page, opaque to clients.
def encode_cursor(task: Task) -> str:
    raw = orjson.dumps([task.created_at.isoformat(), str(task.id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """Parse a listing cursor; raises ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, task_id = orjson.loads(raw)
        return datetime.fromisoformat(ts), UUID(task_id)
    except Exception as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc
