"""The connection pool: autocommit connections, so one statement is one round trip; a
connection that sat idle is checked before it is handed out; a lost connection is retried in
short series, so the pool is back within about a second of the database after any outage."""

from __future__ import annotations

import time
import weakref
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from inferq.settings import Settings

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]

# psycopg_pool retries a lost connection at 1, 3, 7, 15, 31 ... s and holds its slot meanwhile:
# after a 10-30 s failover a replica would wait up to as long again for its next try. Each
# series gives up after this long instead; the freed slot is regrown by the next request
# with an immediate attempt (tests/integration/test_pool_reconnect.py).
RECONNECT_SERIES_S = 2.0


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

    A connection back in the pool for longer than ``settings.pool_check_idle_s`` is checked
    (one empty query) before it is handed out, so that after a PostgreSQL restart or failover
    the dead connections are replaced instead of failing a request each. A connection that was
    in use a moment ago is not checked: that would cost every hot request a second round
    trip, and the callers that wait (waits, streams) retry a read that failed on a dead one.

    New connections go where ``conninfo`` says: with several hosts and
    ``target_session_attrs=read-write`` that is whichever server is the primary now (README,
    "Failover"). A lost connection is retried for RECONNECT_SERIES_S, then its slot is freed
    for the next request to regrow, so the pool is back within about a second of the database.
    """
    conninfo = dsn or settings.database_url
    if not conninfo:
        raise ValueError("no database URL: set INFERQ_DATABASE_URL")
    idle_s = settings.pool_check_idle_s
    returned: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def reset(conn: AsyncConnection[Any]) -> None:
        returned[conn] = time.monotonic()

    async def check(conn: AsyncConnection[Any]) -> None:
        back_at = returned.get(conn)
        if back_at is None or time.monotonic() - back_at >= idle_s:
            await AsyncConnectionPool.check_connection(conn)

    return AsyncConnectionPool(
        conninfo,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs=connection_kwargs(settings),
        connection_class=AsyncConnection,
        open=False,
        name="inferq",
        timeout=10.0,
        reconnect_timeout=RECONNECT_SERIES_S,
        check=check,
        reset=reset,
    )
