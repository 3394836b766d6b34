"""Fair share under saturation: many owners with mixed weights, each with a backlog; how the
claims split between them, and what a claim costs with that many tasks pending.

Design decisions:

- Owners ``o000``… get weights 1, 2, 3, 4 in turn (their tokens' weights, as `inferq token
  create --weight` sets them); each queues ``tasks_per_owner`` tasks in the default lane of a
  fresh pool, all before the first claim, so every owner saturates the lane from the start.
- One claimer takes one task per claim, the way a worker of capacity 1 does, for ``claims``
  claims; each claim's round trip is a latency sample. With the defaults (100 owners x 100
  tasks, 2,000 claims) the queue holds 10,000 to 8,000 pending tasks while it is measured.
- The share error compares each weight's total with what the weights promise
  (claims x weight's owners x weight / sum of weights), as a percentage of the promised
  share; the worst weight is reported. Per-owner counts of a few dozen claims would mostly
  measure rounding, not the scheduler.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import psycopg

from inferq.bench.stats import percentile
from inferq.db.pool import create_pool
from inferq.db.tasks import TaskRepository
from inferq.db.tokens import hash_token
from inferq.settings import Settings

WEIGHTS = (1, 2, 3, 4)


def _seed(dsn: str, pool_name: str, owners: list[str], tasks_per_owner: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, owner in enumerate(owners):
            conn.execute(
                "INSERT INTO inferq.api_token (token_hash, owner_id, role, weight) "
                "VALUES (%s, %s, 'client', %s)",
                (hash_token(f"bench-{pool_name}-{owner}"), owner, WEIGHTS[i % len(WEIGHTS)]),
            )
        conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
            "SELECT %s, '{}', o FROM unnest(%s::text[]) AS o, generate_series(1, %s)",
            (pool_name, owners, tasks_per_owner),
        )
        conn.execute("ANALYZE inferq.task")


async def measure_fairness(
    dsn: str, *, owners: int, tasks_per_owner: int, claims: int
) -> dict[str, float]:
    """The share error (%) and the claim's latency (ms) with ``owners x tasks_per_owner``
    tasks pending at the start; ``claims`` must leave every owner a backlog."""
    pool_name = f"bench-fair-{uuid.uuid4().hex[:8]}"
    names = [f"o{i:03d}" for i in range(owners)]
    _seed(dsn, pool_name, names, tasks_per_owner)
    weight_of = {name: WEIGHTS[i % len(WEIGHTS)] for i, name in enumerate(names)}
    pool = create_pool(Settings(database_url=dsn, pool_min_size=1, pool_max_size=2), dsn)
    await pool.open(wait=True)
    try:
        tasks = TaskRepository(pool)
        session = uuid.uuid4()
        latencies: list[float] = []
        served: Counter[str] = Counter()
        for _ in range(claims):
            started = time.perf_counter()
            [task] = await tasks.claim(session, [pool_name], limit=1, lease_s=600)
            latencies.append(time.perf_counter() - started)
            served[task.owner_id] += 1
    finally:
        await pool.close()
    if max(served.values()) >= tasks_per_owner:
        raise RuntimeError("an owner ran out of work: the lane was not saturated throughout")
    total_weight = sum(weight_of.values())
    errors = []
    for weight in WEIGHTS:
        members = [n for n in names if weight_of[n] == weight]
        if not members:
            continue
        promised = claims * weight * len(members) / total_weight
        got = sum(served[n] for n in members)
        errors.append(abs(got - promised) / promised * 100)
    latencies.sort()
    return {
        "fairness.share_error_pct": max(errors),
        "fairness.claim_p50_ms": percentile(latencies, 0.5) * 1000,
        "fairness.claim_p99_ms": percentile(latencies, 0.99) * 1000,
        "fairness.pending_at_start": float(owners * tasks_per_owner),
    }
