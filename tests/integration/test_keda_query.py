"""The KEDA ScaledObject of deploy/k8s/worker-autoscaling.yaml: its query, exactly as written
in the file, counts the work of its pool on a real database, and uses the partial indexes.

KEDA's PostgreSQL scaler runs ``query`` every pollingInterval, reads one number (pgx scans it
into a float64: a bigint is fine, NULL is an error) and asks for ceil(value /
targetQueryValue) workers, activating the Deployment from zero when value >
activationTargetQueryValue. So the number must be the tasks that need a worker of that pool:
pending, claimed and running ones, and none of another pool or of a terminal state.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from inferq.db.tasks import TaskRepository

pytestmark = pytest.mark.db

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def scaled_object() -> dict[str, Any]:
    (found,) = [d for d in documents("worker-autoscaling.yaml") if d["kind"] == "ScaledObject"]
    return found


def trigger() -> dict[str, Any]:
    (found,) = scaled_object()["spec"]["triggers"]
    assert found["type"] == "postgresql"
    metadata: dict[str, Any] = found["metadata"]
    return metadata


def worker_args() -> dict[str, str]:
    (deployment,) = documents("worker.yaml")
    (worker,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"
    ]
    args = [a for a in worker["args"] if a.startswith("--")]
    return dict(a.removeprefix("--").partition("=")[::2] for a in args)


def count(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(query).fetchall()  # the file's text, verbatim
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return rows[0][0]


def test_the_scaled_object_drives_the_workers_of_its_pool() -> None:
    """The ScaledObject scales worker.yaml's Deployment; the query names that Deployment's
    pool; a worker's share is its capacity; scale to zero is on."""
    (deployment,) = documents("worker.yaml")
    spec = scaled_object()["spec"]
    args = worker_args()
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert f"pool_name = '{args['pool']}'" in trigger()["query"]
    assert float(trigger()["targetQueryValue"]) == float(args["capacity"])
    assert spec["minReplicaCount"] == 0
    assert float(trigger()["activationTargetQueryValue"]) == 0


async def test_the_query_counts_pending_and_held_tasks_of_its_pool(pool: Any, dsn: str) -> None:
    query = trigger()["query"]
    name = worker_args()["pool"]
    tasks = TaskRepository(pool)
    assert count(dsn, query) == 0  # nothing queued: KEDA keeps the pool at zero workers

    async def enqueue(pool_name: str, n: int) -> list[Any]:
        return [
            (await tasks.enqueue(owner_id="o", pool_name=pool_name, request_body={"n": i})).task
            for i in range(n)
        ]

    mine = await enqueue(name, 10)
    await enqueue("another-pool", 5)
    session = uuid.uuid4()
    held = await tasks.claim(session, [name], limit=6, lease_s=60)  # 4 pending, 6 claimed
    assert len(held) == 6
    running = [await tasks.start(t.id, session, t.attempt) for t in held[:4]]  # 2 claimed
    for t in running[:2]:
        await tasks.complete(t.id, session, t.attempt, {"text": "done"})  # 2 running
    await tasks.fail(held[4].id, session, held[4].attempt, "boom")  # 1 claimed
    pending = [t for t in mine if t.id not in {h.id for h in held}]
    await tasks.cancel(pending[0].id, "o")  # 3 pending
    other = uuid.uuid4()
    await tasks.claim(other, ["another-pool"], limit=2, lease_s=60)

    value = count(dsn, query)
    assert isinstance(value, int)  # never NULL: KEDA cannot scan NULL into a number
    assert value == 3 + 1 + 2  # pending + claimed + running of its pool, nothing else
    per_worker = float(trigger()["targetQueryValue"])
    assert math.ceil(value / per_worker) == 1
    assert value > float(trigger()["activationTargetQueryValue"])


def test_the_query_reads_partial_indexes_not_the_table(dsn: str) -> None:
    """Terminal rows (kept for days) are never read: with sequential scans off, a query with
    no index path would still get one, so none in the plan means every part has one."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + trigger()["query"]))
    assert "Seq Scan" not in plan, plan
