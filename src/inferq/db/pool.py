"""The connection pool: autocommit connections, so one statement is one round trip."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from inferq.settings import Settings

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options shared by the pool and the listener."""
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "inferq"}
    if not settings.prepared_statements:
        kwargs["prepare_threshold"] = None
    if settings.statement_timeout_ms:
        kwargs["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
    return kwargs


def create_pool(settings: Settings, dsn: str | None = None) -> Pool:
    """A closed pool for ``dsn`` (default: settings.database_url); the caller opens it.

    Connections are in autocommit: a guarded single-statement write costs one round trip,
    and multi-statement work opens ``conn.transaction()`` explicitly.
    """
    conninfo = dsn or settings.database_url
    if not conninfo:
        raise ValueError("no database URL: set INFERQ_DATABASE_URL")
    return AsyncConnectionPool(
        conninfo,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs=connection_kwargs(settings),
        connection_class=AsyncConnection,
        open=False,
        name="inferq",
        timeout=10.0,
    )
