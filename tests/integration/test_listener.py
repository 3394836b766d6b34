"""The Listener: one LISTEN connection per replica, reconnect + resync, 10,000 waiters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.bench.wakeups import Stack
from inferq.db import channels
from inferq.db.listener import Listener
from inferq.domain.task import TaskStatus
from inferq.settings import Settings
from inferq.wakeups import Hub
from tests.api_helpers import allow_connections

pytestmark = pytest.mark.db

COUNT_LISTENERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = 'inferq-listener'"
)


@pytest.fixture
async def admin(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        yield conn


async def insert_tasks(conn: psycopg.AsyncConnection[Any], n: int) -> list[UUID]:
    cur = await conn.execute(
        "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
        "SELECT 'p', '{}', 'o' FROM generate_series(1, %s) RETURNING id",
        (n,),
    )
    return [row[0] for row in await cur.fetchall()]


async def finish(conn: psycopg.AsyncConnection[Any], ids: list[UUID]) -> None:
    """pending -> claimed -> completed by hand, as another replica would commit it."""
    for status in ("claimed", "completed"):
        await conn.execute("UPDATE inferq.task SET status = %s WHERE id = ANY(%s)", (status, ids))


async def test_notifications_reach_the_hub_and_token_callback(settings: Settings, dsn: str) -> None:
    hub = Hub()
    revoked: list[str] = []
    listener = Listener(settings, hub, on_token_revoked=revoked.append)
    await listener.start()
    try:
        assert listener.healthy
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (channels.TOKEN, "tok-1"))
            await conn.execute("SELECT pg_notify(%s, %s)", (channels.TASK, "not json"))
            await eventually(lambda: revoked == ["tok-1"] and listener.stats.malformed == 1, 30)
    finally:
        await listener.stop()
    assert not listener.healthy


async def test_lost_notifications_are_recovered_by_reconnect_and_resync(
    settings: Settings, admin: psycopg.AsyncConnection[Any], pg_server: Any
) -> None:
    # No safety poll: only the resync after the reconnect can resolve the waiters.
    stack = await Stack.open(settings.model_copy(update={"safety_poll_s": 3600}))
    try:
        ids = await insert_tasks(admin, 20)
        waits = [asyncio.create_task(stack.waits.wait_terminal(i, 120)) for i in ids]
        await eventually(lambda: stack.hub.waiter_count == 20, 30)
        assert stack.listener.healthy
        old_pid = stack.listener.backend_pid
        # Hold the listener down: it cannot reconnect while the database refuses new sessions.
        await allow_connections(pg_server, admin.info.dbname, False)
        await admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
        await eventually(lambda: not stack.listener.healthy, 30)
        await finish(admin, ids)  # committed during the gap: these notifications are lost
        await allow_connections(pg_server, admin.info.dbname, True)
        done = await asyncio.wait_for(asyncio.gather(*waits), 30)
        assert all(t.status is TaskStatus.COMPLETED for t in done)
        assert stack.listener.stats.reconnects >= 1
        assert stack.listener.backend_pid != old_pid
        cur = await admin.execute(COUNT_LISTENERS)
        assert await cur.fetchone() == (1,)
    finally:
        await stack.close()


async def test_ten_thousand_waiters_share_one_listen_connection(
    settings: Settings, admin: psycopg.AsyncConnection[Any]
) -> None:
    stack = await Stack.open(settings.model_copy(update={"safety_poll_s": 3600}))
    try:
        ids = await insert_tasks(admin, 10_000)
        waits = [asyncio.create_task(stack.waits.wait_terminal(i, 300)) for i in ids]
        await eventually(lambda: stack.hub.waiter_count == 10_000, 120)
        await finish(admin, ids)
        done = await asyncio.wait_for(asyncio.gather(*waits), 120)
        assert all(t.status is TaskStatus.COMPLETED for t in done)
        assert stack.hub.waiter_count == 0
        cur = await admin.execute(COUNT_LISTENERS)
        assert await cur.fetchone() == (1,)
        cur = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query ILIKE 'LISTEN%%'"
        )
        row = await cur.fetchone()
        assert row is not None and row[0] <= 1
    finally:
        await stack.close()
