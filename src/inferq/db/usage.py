"""UsageRepository: the usage totals per hour, owner, token and model (sql/0007_quotas.sql).

The totals are written by the trigger that completes a task (inferq.add_task_usage), in the
completion's own transaction; this module only reads them.
"""

from __future__ import annotations

from datetime import datetime

from psycopg.rows import class_row

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.domain.quotas import UsageRow

TOTALS = """
SELECT hour, owner_id, token_id, model, requests, prompt_tokens, completion_tokens
FROM inferq.usage_hour
WHERE (%(owner)s::text IS NULL OR owner_id = %(owner)s)
  AND hour >= %(from)s AND hour < %(to)s
ORDER BY hour, owner_id, model NULLS FIRST, token_id NULLS FIRST
LIMIT %(limit)s
"""


class UsageRepository:
    """Reads usage totals."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def totals(
        self, owner_id: str | None, start: datetime, end: datetime, limit: int
    ) -> list[UsageRow]:
        """The rows of hours in [start, end), of one owner or (None) every owner, oldest
        first, at most ``limit``."""
        params = {"owner": owner_id, "from": start, "to": end, "limit": limit}
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(UsageRow))
            await cur.execute(TOTALS, params)
            return await cur.fetchall()
