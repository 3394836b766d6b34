"""The database itself rejects every illegal transition, even a hand-written UPDATE."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from inferq.domain.task import TaskStatus, transition_allowed

pytestmark = pytest.mark.db

# How to bring a fresh task into each status through legal steps.
PATH = {
    TaskStatus.PENDING: [],
    TaskStatus.CLAIMED: ["claimed"],
    TaskStatus.RUNNING: ["claimed", "running"],
    TaskStatus.COMPLETED: ["claimed", "running", "completed"],
    TaskStatus.ERROR: ["claimed", "error"],
    TaskStatus.CANCELLED: ["cancelled"],
}

PAIRS = [(a, b) for a, b in itertools.product(TaskStatus, TaskStatus) if a != b]


def make_task(conn: psycopg.Connection[Any], status: TaskStatus) -> Any:
    row = conn.execute(
        "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
        "VALUES ('p', '{}', 'o') RETURNING id"
    ).fetchone()
    assert row is not None
    for step in PATH[status]:
        conn.execute("UPDATE inferq.task SET status = %s WHERE id = %s", (step, row[0]))
    return row[0]


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_raw_update_obeys_the_state_machine(dsn: str, old: TaskStatus, new: TaskStatus) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        task_id = make_task(conn, old)
        update = "UPDATE inferq.task SET status = %s WHERE id = %s"
        if transition_allowed(old, new):
            conn.execute(update, (new, task_id))
        else:
            with pytest.raises(psycopg.DatabaseError) as exc:
                conn.execute(update, (new, task_id))
            assert exc.value.sqlstate in ("IQ001", "IQ002")
            assert str(task_id) in str(exc.value)
        row = conn.execute("SELECT status FROM inferq.task WHERE id = %s", (task_id,)).fetchone()
    assert row == ((new if transition_allowed(old, new) else old).value,)


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.ERROR, TaskStatus.CANCELLED])
def test_terminal_rows_cannot_be_edited_at_all(dsn: str, status: TaskStatus) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        task_id = make_task(conn, status)
        with pytest.raises(psycopg.DatabaseError) as exc:
            conn.execute("UPDATE inferq.task SET response_body = '1' WHERE id = %s", (task_id,))
    assert exc.value.sqlstate == "IQ002"


def test_a_new_task_must_start_pending(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.DatabaseError):
        conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id, status) "
            "VALUES ('p', '{}', 'o', 'completed')"
        )


def test_python_table_matches_database_function(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for old, new in itertools.product(TaskStatus, TaskStatus):
            row = conn.execute(
                "SELECT inferq.transition_allowed(%s, %s)", (old.value, new.value)
            ).fetchone()
            assert row == (transition_allowed(old, new),), (old, new)
