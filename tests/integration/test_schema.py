"""The seed's schema checks, on the real inferq schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

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


DRAIN = """
SELECT id FROM inferq.task WHERE status = 'pending' AND pool_name = ANY(%s)
ORDER BY priority DESC, created_at, id
"""


def test_drain_returns_pending_rows_of_requested_pools_fifo(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = insert(conn, "p1")
        other_pool = insert(conn, "p2")
        second = insert(conn, "p1")
        taken = insert(conn, "p1")
        third = insert(conn, "p1")
        conn.execute("UPDATE inferq.task SET status = 'claimed' WHERE id = %s", (taken,))
        ids = [r[0] for r in conn.execute(DRAIN, (["p1"],)).fetchall()]
        both = {r[0] for r in conn.execute(DRAIN, (["p1", "p2"],)).fetchall()}
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + DRAIN, (["p1"],)).fetchall())
    assert ids == [first, second, third]
    assert both == {first, second, third, other_pool}
    assert "task_pending_drain_idx" in plan or "Seq Scan" in plan  # tiny table: either is fine


def test_held_by_session_returns_only_claimed_and_running_rows_of_that_session(dsn: str) -> None:
    me, other = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [insert(conn) for _ in range(5)]
        upd = "UPDATE inferq.task SET status = %s, claimed_by = %s WHERE id = %s"
        conn.execute(upd, ("claimed", me, ids[0]))
        conn.execute(upd, ("claimed", me, ids[1]))
        conn.execute("UPDATE inferq.task SET status = 'running' WHERE id = %s", (ids[1],))
        conn.execute(upd, ("claimed", me, ids[2]))
        conn.execute("UPDATE inferq.task SET status = 'completed' WHERE id = %s", (ids[2],))
        conn.execute(upd, ("claimed", other, ids[3]))
        held = {
            r[0]
            for r in conn.execute(
                "SELECT id FROM inferq.task WHERE claimed_by = %s "
                "AND status IN ('claimed', 'running')",
                (me,),
            ).fetchall()
        }
    assert held == {ids[0], ids[1]}


def test_gc_predicate_picks_terminal_rows_older_than_retention_only(dsn: str) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    old, recent = now - timedelta(days=8), now - timedelta(days=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = {}
        for name, status, completed in [
            ("old_done", "completed", old),
            ("old_error", "error", old),
            ("old_cancelled", "cancelled", old),
            ("recent_done", "completed", recent),
        ]:
            rows[name] = insert(conn)
            if status != "cancelled":
                conn.execute("UPDATE inferq.task SET status='claimed' WHERE id=%s", (rows[name],))
            conn.execute(
                "UPDATE inferq.task SET status = %s, completed_at = %s WHERE id = %s",
                (status, completed, rows[name]),
            )
        rows["old_pending"] = insert(conn, created_at=old)
        picked = {
            r[0]
            for r in conn.execute(
                "SELECT id FROM inferq.task WHERE status IN ('completed','error','cancelled') "
                "AND completed_at < %s - interval '7 days'",
                (now,),
            ).fetchall()
        }
    assert picked == {rows["old_done"], rows["old_error"], rows["old_cancelled"]}


def test_agent_id_is_nullable(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        without = insert(conn)
        with_agent = insert(conn, agent_id="agent-7")
        rows = dict(
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
