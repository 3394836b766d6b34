"""/metrics tells how much waits in each pool and for how long: what alerts and autoscalers read.

``inferq_queue_depth{pool,lane}`` is the pending count and
``inferq_queue_oldest_pending_age_seconds{pool,lane}`` how long the oldest pending task has waited,
in database time. Tasks held by workers or ended do not count; a pool with nothing pending
reads 0.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from inferq.db.tasks import TaskRepository
from inferq.settings import Settings
from tests.api_helpers import serve_app

pytestmark = pytest.mark.db

AGED_S = 90


def series(metrics: str, name: str, lane: str = "default") -> dict[str, float]:
    """pool label -> value of ``name`` for ``lane`` in a Prometheus text page."""
    found = re.findall(rf'^{name}\{{lane="{lane}",pool="([^"]+)"\}} (\S+)$', metrics, re.M)
    return {pool: float(value) for pool, value in found}


async def test_pending_depth_and_oldest_age_per_pool(
    settings: Settings, dsn: str, pool: Any
) -> None:
    tasks = TaskRepository(pool)

    async def enqueue(pool_name: str) -> Any:
        enqueued = await tasks.enqueue(owner_id="o", pool_name=pool_name, request_body={})
        return enqueued.task

    old = await enqueue("gpu-a")
    await enqueue("gpu-a")
    held = await enqueue("gpu-b")
    waiting = await enqueue("gpu-b")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A task of gpu-a queued AGED_S ago; gpu-b's older task is claimed below, so its
        # oldest pending one is recent.
        conn.execute(
            "UPDATE inferq.task SET created_at = now() - make_interval(secs => %s) "
            "WHERE id = ANY(%s)",
            (AGED_S, [old.id, held.id]),
        )
        conn.execute(
            "UPDATE inferq.task SET created_at = now() - interval '10 seconds' WHERE id = %s",
            (waiting.id,),
        )
    claimed = await tasks.claim(uuid.uuid4(), ["gpu-b"], limit=1, lease_s=60)
    assert [t.id for t in claimed] == [held.id]
    done = await enqueue("gpu-c")
    session = uuid.uuid4()
    (taken,) = await tasks.claim(session, ["gpu-c"], limit=1, lease_s=60)
    await tasks.complete(taken.id, session, taken.attempt, {"text": "ok"})
    assert taken.id == done.id

    async with serve_app(settings, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        metrics = (await http.get("/metrics")).text

    depth = series(metrics, "inferq_queue_depth")
    age = series(metrics, "inferq_queue_oldest_pending_age_seconds")
    assert depth == {"gpu-a": 2, "gpu-b": 1, "gpu-c": 0}
    assert AGED_S <= age["gpu-a"] < AGED_S + 30
    assert 10 <= age["gpu-b"] < AGED_S  # the claimed older task does not count
    assert age["gpu-c"] == 0
