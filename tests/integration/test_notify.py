"""The status trigger: one notification per status change, none when the status stays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from inferq.db import channels

pytestmark = pytest.mark.db


@pytest.fixture
def listener(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {channels.TASK}")
        yield conn


def drain(conn: psycopg.Connection[Any]) -> list[Any]:
    """Every notification delivered so far (they arrive at commit, before execute returns)."""
    conn.execute("SELECT 1")
    return [json.loads(n.payload) for n in conn.notifies(timeout=0.2)]


def test_one_notification_per_status_change_with_the_documented_payload(
    dsn: str, listener: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
            "VALUES ('gpu-a', '{}', 'o') RETURNING id::text"
        ).fetchone()
        assert row is not None
        task_id = row[0]
        assert drain(listener) == [[[task_id, "pending", "gpu-a", 0]]]

        conn.execute(
            "UPDATE inferq.task SET status = 'claimed', attempt = 1 WHERE id = %s", (task_id,)
        )
        assert drain(listener) == [[[task_id, "claimed", "gpu-a", 1]]]

        # Lease extensions and other updates that keep the status send nothing.
        conn.execute("UPDATE inferq.task SET lease_expires_at = now() WHERE id = %s", (task_id,))
        conn.execute("UPDATE inferq.task SET priority = 3 WHERE id = %s", (task_id,))
        assert drain(listener) == []

        conn.execute("UPDATE inferq.task SET status = 'running' WHERE id = %s", (task_id,))
        conn.execute("UPDATE inferq.task SET status = 'completed' WHERE id = %s", (task_id,))
        assert drain(listener) == [
            [[task_id, "running", "gpu-a", 1]],
            [[task_id, "completed", "gpu-a", 1]],
        ]


def test_a_statement_over_many_rows_sends_few_small_notifications(
    dsn: str, listener: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
            "SELECT 'p', '{}', 'o' FROM generate_series(1, 120)"
        )
        inserted = drain(listener)
        conn.execute("UPDATE inferq.task SET status = 'cancelled'")
        cancelled = drain(listener)
    for batch in (inserted, cancelled):
        assert len(batch) == 3  # 50 + 50 + 20 rows: one payload each, far below 8000 bytes
        rows = [item for payload in batch for item in payload]
        assert len({r[0] for r in rows}) == 120
    assert {r[1] for p in cancelled for r in p} == {"cancelled"}


def test_a_rolled_back_change_sends_nothing(dsn: str, listener: psycopg.Connection[Any]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id) VALUES ('p', '{}', 'o')"
        )
        conn.rollback()
    assert drain(listener) == []
