"""The schema and the repository's own drain, claim, held-by and GC queries on it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from inferq.db.pool import Pool
from inferq.db.task_queries import CLAIM, FIND_PENDING, HELD_BY_SESSION
from inferq.db.tasks import TaskRepository, scheduling_params

pytestmark = pytest.mark.db


def insert(conn: psycopg.Connection[Any], pool: str = "p1", **extra: Any) -> Any:
    cols = {"pool_name": pool, "request_body": Jsonb({"x": 1}), "owner_id": "alice", **extra}
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    row = conn.execute(
        f"INSERT INTO inferq.task ({names}) VALUES ({marks}) RETURNING id", list(cols.values())
    ).fetchone()
    assert row is not None
    return row[0]


def test_fresh_row_defaults_to_pending_with_empty_claim_fields(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        task_id = insert(conn)
        row = conn.execute(
            "SELECT status, claimed_by, claimed_at, completed_at, stream_started_at, streaming, "
            "attempt, lease_expires_at, response_body, error_message "
            "FROM inferq.task WHERE id = %s",
            (task_id,),
        ).fetchone()
    assert row == ("pending", None, None, None, None, False, 0, None, None, None)


def test_structured_bodies_round_trip(dsn: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "héllo ✓"}],
        "temperature": 0.5,
        "nested": {"a": [1, 2, {"b": None}]},
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        task_id = insert(conn, request_body=Jsonb(body))
        conn.execute("UPDATE inferq.task SET status = 'claimed' WHERE id = %s", (task_id,))
        conn.execute(
            "UPDATE inferq.task SET status = 'completed', response_body = %s WHERE id = %s",
            (Jsonb({"choices": [{"text": "ok"}]}), task_id),
        )
        row = conn.execute(
            "SELECT request_body, response_body FROM inferq.task WHERE id = %s", (task_id,)
        ).fetchone()
    assert row == (body, {"choices": [{"text": "ok"}]})


def pending_in_drain_order(conn: psycopg.Connection[Any], pools: list[str]) -> list[Any]:
    """The repository's own drain query (FIND_PENDING), ids only."""
    rows = conn.execute(FIND_PENDING, {"pools": pools, "limit": 100}).fetchall()
    return [r[0] for r in rows]


def claim_one(conn: psycopg.Connection[Any], pools: list[str]) -> Any:
    """The repository's own claim (CLAIM) of a single task for a session with no row."""
    params = {"session": uuid.uuid4(), "pools": pools, "limit": 1, "lease_s": 30, "unbound": 1}
    rows = conn.execute(CLAIM, {**params, **scheduling_params()}).fetchall()
    return rows[0][0] if rows else None


def test_drain_and_claim_take_priority_first_then_fifo_in_the_requested_pools(dsn: str) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Created in this order; priority disagrees with FIFO on purpose.
        old_low = insert(conn, "p1", created_at=t0)
        other_pool = insert(conn, "p2", created_at=t0 + timedelta(seconds=1), priority=9)
        mid_high = insert(conn, "p1", created_at=t0 + timedelta(seconds=2), priority=5)
        taken = insert(conn, "p1", created_at=t0 + timedelta(seconds=3), priority=9)
        new_low = insert(conn, "p1", created_at=t0 + timedelta(seconds=4))
        new_high = insert(conn, "p1", created_at=t0 + timedelta(seconds=5), priority=5)
        negative = insert(conn, "p1", created_at=t0 - timedelta(seconds=9), priority=-1)
        conn.execute("UPDATE inferq.task SET status = 'claimed' WHERE id = %s", (taken,))
        expected = [mid_high, new_high, old_low, new_low, negative]
        assert pending_in_drain_order(conn, ["p1"]) == expected
        assert set(pending_in_drain_order(conn, ["p1", "p2"])) == {*expected, other_pool}
        assert [claim_one(conn, ["p1"]) for _ in range(6)] == [*expected, None]


def test_equal_priority_and_creation_time_drain_by_id(dsn: str) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    ids = [uuid.UUID(int=n) for n in (3, 1, 2)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for task_id in ids:
            insert(conn, "p1", id=task_id, created_at=t0)
        assert pending_in_drain_order(conn, ["p1"]) == [ids[1], ids[2], ids[0]]
        assert [claim_one(conn, ["p1"]) for _ in range(3)] == [ids[1], ids[2], ids[0]]


def load_a_settled_queue(conn: psycopg.Connection[Any]) -> None:
    """40,000 rows over 8 pools, 90% of them ended: a queue that has run a while, before its
    terminal rows are collected. 3,000 of the 4,000 pending rows are a backlog of pool-0,
    whose workers are away. ANALYZEd, as autovacuum would have done."""
    # The ended rows are written as such directly, triggers off for this one load (superuser),
    # so that the partial indexes hold what a settled queue's would: its pending rows only.
    conn.execute("SET session_replication_role = replica")
    conn.execute(
        "INSERT INTO inferq.task (pool_name, request_body, owner_id, priority, status, "
        "attempt, completed_at) "
        "SELECT 'pool-' || (g % 8), '{}', 'o' || (g % 50), g % 3, "
        "(ARRAY['completed', 'error', 'cancelled'])[1 + g % 3]::inferq.task_status, 1, now() "
        "FROM generate_series(1, 36000) AS g"
    )
    conn.execute("RESET session_replication_role")
    conn.execute(
        "INSERT INTO inferq.task (pool_name, request_body, owner_id, priority) "
        "SELECT CASE WHEN g <= 3000 THEN 'pool-0' ELSE 'pool-' || (g % 8) END, '{}', "
        "'o' || (g % 50), g % 3 FROM generate_series(1, 4000) AS g"
    )
    conn.execute("ANALYZE inferq.task")
    counts = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(DISTINCT pool_name), count(*) "
        "FROM inferq.task"
    ).fetchone()
    assert counts == (4000, 8, 40000)


def explain(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> str:
    return "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, params).fetchall())


PENDING_ONLY = ("lane_drain", "pending_pool_age", "pending_age")


@pytest.mark.parametrize("pools", [["pool-3"], ["pool-0"], ["pool-1", "pool-6"]])
def test_drain_and_claim_plans_use_the_pending_indexes(dsn: str, pools: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        load_a_settled_queue(conn)
        params = {"pools": pools, "limit": 8}
        drain = explain(conn, FIND_PENDING, params)
        params = {**params, "session": uuid.uuid4(), "lease_s": 30, "unbound": 8}
        claim = explain(conn, CLAIM, {**params, **scheduling_params()})
    # sql/0006_scheduling.sql: the claim reads each owner's head through task_lane_drain_idx
    # and aged tasks through task_pending_pool_age_idx; nothing reads the ended rows.
    assert "task_lane_drain_idx" in claim and "task_pending_pool_age_idx" in claim, claim
    assert "Seq Scan on task" not in claim, claim
    # The drain view (not the claim) reads the pending rows through any pending-only index.
    assert any(f"task_{name}_idx" in drain for name in PENDING_ONLY), drain
    assert "Seq Scan on task" not in drain, drain


def test_held_by_session_returns_only_claimed_and_running_rows_of_that_session(dsn: str) -> None:
    me, other = uuid.UUID(int=10), uuid.UUID(int=11)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [insert(conn) for _ in range(5)]
        upd = "UPDATE inferq.task SET status = %s, claimed_by = %s WHERE id = %s"
        conn.execute(upd, ("claimed", me, ids[0]))
        conn.execute(upd, ("claimed", me, ids[1]))
        conn.execute("UPDATE inferq.task SET status = 'running' WHERE id = %s", (ids[1],))
        conn.execute(upd, ("claimed", me, ids[2]))
        conn.execute("UPDATE inferq.task SET status = 'completed' WHERE id = %s", (ids[2],))
        conn.execute(upd, ("claimed", other, ids[3]))
        held = {r[0] for r in conn.execute(HELD_BY_SESSION, {"session": me}).fetchall()}
    assert held == {ids[0], ids[1]}


async def test_gc_fails_stale_pending_and_deletes_only_terminal_rows_past_retention(
    dsn: str, pool: Pool
) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    old, recent = now - timedelta(days=8), now - timedelta(days=6)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = {}
        for name, status, completed in [
            ("old_done", "completed", old),
            ("old_error", "error", old),
            ("old_cancelled", "cancelled", old),
            ("recent_done", "completed", recent),
            ("recent_error", "error", recent),
        ]:
            rows[name] = insert(conn)
            if status != "cancelled":
                conn.execute("UPDATE inferq.task SET status='claimed' WHERE id=%s", (rows[name],))
            conn.execute(
                "UPDATE inferq.task SET status = %s, completed_at = %s WHERE id = %s",
                (status, completed, rows[name]),
            )
        rows["old_claimed"] = insert(conn, created_at=old)
        conn.execute("UPDATE inferq.task SET status='claimed' WHERE id=%s", (rows["old_claimed"],))
        rows["stale_pending"] = insert(conn, "gpu-x", created_at=now - timedelta(minutes=61))
        rows["fresh_pending"] = insert(conn, created_at=now - timedelta(minutes=59))

    result = await TaskRepository(pool).gc(pending_timeout_s=3600, retention_s=7 * 86400, now=now)

    assert [t.id for t in result.expired_pending] == [rows["stale_pending"]]
    assert result.deleted == 3
    with psycopg.connect(dsn, autocommit=True) as conn:
        left: dict[Any, str] = dict(conn.execute("SELECT id, status FROM inferq.task").fetchall())
        message = conn.execute(
            "SELECT error_message, completed_at FROM inferq.task WHERE id = %s",
            (rows["stale_pending"],),
        ).fetchone()
    assert left == {
        rows["recent_done"]: "completed",
        rows["recent_error"]: "error",
        rows["old_claimed"]: "claimed",
        rows["stale_pending"]: "error",
        rows["fresh_pending"]: "pending",
    }
    assert message is not None
    assert "gpu-x" in message[0] and "3600" in message[0] and message[1] == now


def test_agent_id_is_nullable(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        without = insert(conn)
        with_agent = insert(conn, agent_id="agent-7")
        rows: dict[Any, str | None] = dict(
            conn.execute(
                "SELECT id, agent_id FROM inferq.task WHERE id = ANY(%s)", ([without, with_agent],)
            ).fetchall()
        )
    assert rows == {without: None, with_agent: "agent-7"}


def test_idempotency_key_is_unique_per_owner(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        insert(conn, idempotency_key="k1")
        insert(conn, idempotency_key="k1", owner_id="bob")
        with pytest.raises(psycopg.errors.UniqueViolation):
            insert(conn, idempotency_key="k1")
