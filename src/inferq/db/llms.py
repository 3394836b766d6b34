"""LlmRepository: the registry that maps a model name to a pool."""

from __future__ import annotations

from psycopg import sql
from psycopg.rows import class_row

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.domain.records import Llm
from inferq.errors import UnknownModel

_COLUMNS = sql.SQL("name, pool_name, model, tier, created_at, max_tokens, max_n")


class LlmRepository:
    """Adds, resolves, lists and removes registry entries."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def put(
        self,
        name: str,
        pool_name: str,
        model: str | None = None,
        tier: str = "standard",
        *,
        max_tokens: int | None = None,
        max_n: int | None = None,
    ) -> Llm:
        """Add or replace an entry; queued tasks keep the routing they were enqueued with."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(Llm))
            await cur.execute(
                sql.SQL(
                    "INSERT INTO inferq.llm (name, pool_name, model, tier, max_tokens, max_n) "
                    "VALUES (%s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET pool_name = excluded.pool_name, "
                    "model = excluded.model, tier = excluded.tier, "
                    "max_tokens = excluded.max_tokens, max_n = excluded.max_n RETURNING {}"
                ).format(_COLUMNS),
                (name, pool_name, model or name, tier, max_tokens, max_n),
            )
            llm = await cur.fetchone()
        assert llm is not None
        return llm

    async def resolve(self, name: str) -> Llm:
        """The entry named ``name``; raises UnknownModel."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(Llm))
            await cur.execute(
                sql.SQL("SELECT {} FROM inferq.llm WHERE name = %s").format(_COLUMNS), (name,)
            )
            llm = await cur.fetchone()
        if llm is None:
            raise UnknownModel(f"model {name!r} does not exist; list models with GET /v1/models")
        return llm

    async def all(self) -> list[Llm]:
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(Llm))
            await cur.execute(sql.SQL("SELECT {} FROM inferq.llm ORDER BY name").format(_COLUMNS))
            return await cur.fetchall()

    async def remove(self, name: str) -> bool:
        async with connect(self.pool) as conn:
            cur = await conn.execute("DELETE FROM inferq.llm WHERE name = %s", (name,))
            return cur.rowcount > 0
