"""After a long database outage (a failover manager's detection, a slow restart) the pool is
back within about a second of the database, not after psycopg_pool's doubling backoff.

psycopg_pool retries a lost connection at 1, 3, 7, 15, 31 ... s and keeps the slot meanwhile,
so a replica whose connections broke at t=0 and whose database came back at t=8 s would only
try again at t=15 s: seven more seconds of 503s. inferq.db.pool cuts each series short
(``RECONNECT_SERIES_S``): the slot is given up and the next request grows the pool again with
an immediate attempt. The test owns its PostgreSQL, stops it for OUTAGE_S while requests keep
asking for connections, starts it again, and times the first request that gets one.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import psycopg_pool
import pytest

from inferq.bench.polling import eventually
from inferq.db.cluster import PrivateCluster
from inferq.db.pool import Pool, create_pool
from inferq.settings import Settings

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

OUTAGE_S = 8.0  # past psycopg_pool's third retry (t=7 s): its next one would be at t=15 s
BACK_WITHIN_S = 2.5


async def served(pool: Pool, timeout_s: float) -> bool:
    """Whether one request got a working connection within ``timeout_s``."""
    try:
        async with pool.connection(timeout_s) as conn:
            await conn.execute("SELECT 1")
        return True
    except (psycopg_pool.PoolTimeout, psycopg.Error):
        return False


async def test_the_pool_is_back_soon_after_a_long_outage(own_cluster: PrivateCluster) -> None:
    settings = Settings(database_url=own_cluster.dsn, pool_min_size=2, pool_max_size=4)
    pool = create_pool(settings)
    await pool.open(wait=True)
    try:
        assert await served(pool, 5)
        await asyncio.to_thread(own_cluster.stop, "immediate")
        down_at = time.monotonic()
        # Requests keep coming while the database is away, as they do on a replica.
        while time.monotonic() - down_at < OUTAGE_S:
            assert not await served(pool, 0.25)
        await asyncio.to_thread(own_cluster.start)
        back_at = time.monotonic()
        while not await served(pool, 0.25):
            assert time.monotonic() - back_at < 30, "the pool never reconnected"
        took = time.monotonic() - back_at
        print(f"pool serving again {took:.2f}s after the database (outage {OUTAGE_S:g}s)")
        assert took < BACK_WITHIN_S
    finally:
        await pool.close()


async def test_a_broken_connection_gives_up_its_slot_while_the_database_is_down(
    own_cluster: PrivateCluster,
) -> None:
    # What makes the test above pass, checked without racing psycopg_pool's retry times:
    # left to itself the pool would hold each broken slot for its 5-minute reconnect series,
    # so the first request after the outage would wait for the series' next try.
    settings = Settings(database_url=own_cluster.dsn, pool_min_size=2, pool_max_size=4)
    pool = create_pool(settings)
    await pool.open(wait=True)
    try:
        assert await served(pool, 5)
        assert pool.get_stats()["pool_size"] >= 2
        await asyncio.to_thread(own_cluster.stop, "immediate")
        for _ in range(3):
            assert not await served(pool, 0.25)
        await eventually(
            lambda: pool.get_stats()["pool_size"] == 0, 30, "the broken slots to be given up"
        )
    finally:
        await asyncio.to_thread(own_cluster.start)
        await pool.close()
