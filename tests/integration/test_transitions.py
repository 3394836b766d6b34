"""The database itself rejects every illegal transition, even a hand-written UPDATE.

The legal moves are written out below by hand, from the state machine in DESIGN.md, and both
the trigger (inferq.transition_allowed) and the Python table (inferq.domain.task) are checked
against them: a move added to both of them in the same commit still fails here.
"""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from inferq.domain.task import TaskStatus, transition_allowed

pytestmark = pytest.mark.db

STATUSES = ["pending", "claimed", "running", "completed", "error", "cancelled"]

# DESIGN.md: pending -> claimed | cancelled | error (GC); claimed -> running | completed | error |
# cancelled | pending (revert); running -> completed | error | cancelled | pending (revert);
# completed, error and cancelled are terminal and go nowhere.
LEGAL = {
    ("pending", "claimed"),
    ("pending", "cancelled"),
    ("pending", "error"),
    ("claimed", "running"),
    ("claimed", "completed"),
    ("claimed", "error"),
    ("claimed", "cancelled"),
    ("claimed", "pending"),
    ("running", "completed"),
    ("running", "error"),
    ("running", "cancelled"),
    ("running", "pending"),
}

# How to bring a fresh task into each status through legal steps.
PATH = {
    "pending": [],
    "claimed": ["claimed"],
    "running": ["claimed", "running"],
    "completed": ["claimed", "running", "completed"],
    "error": ["claimed", "error"],
    "cancelled": ["cancelled"],
}

TERMINAL = {"completed", "error", "cancelled"}

PAIRS = [(a, b) for a, b in itertools.product(STATUSES, STATUSES) if a != b]


def make_task(conn: psycopg.Connection[Any], status: str) -> Any:
    row = conn.execute(
        "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
        "VALUES ('p', '{}', 'o') RETURNING id"
    ).fetchone()
    assert row is not None
    for step in PATH[status]:
        conn.execute("UPDATE inferq.task SET status = %s WHERE id = %s", (step, row[0]))
    return row[0]


def test_the_enum_has_exactly_the_statuses_of_the_state_machine() -> None:
    assert sorted(s.value for s in TaskStatus) == sorted(STATUSES)


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_raw_update_obeys_the_state_machine(dsn: str, old: str, new: str) -> None:
    legal = (old, new) in LEGAL
    with psycopg.connect(dsn, autocommit=True) as conn:
        task_id = make_task(conn, old)
        update = "UPDATE inferq.task SET status = %s WHERE id = %s"
        if legal:
            conn.execute(update, (new, task_id))
        else:
            with pytest.raises(psycopg.DatabaseError) as exc:
                conn.execute(update, (new, task_id))
            # IQ002: a terminal row was touched; IQ001: an illegal move out of a live status.
            assert exc.value.sqlstate == ("IQ002" if old in TERMINAL else "IQ001")
            assert str(task_id) in str(exc.value)
        row = conn.execute("SELECT status FROM inferq.task WHERE id = %s", (task_id,)).fetchone()
    assert row == ((new if legal else old),)


@pytest.mark.parametrize("status", ["completed", "error", "cancelled"])
def test_terminal_rows_cannot_be_edited_at_all(dsn: str, status: str) -> None:
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


def test_database_function_is_the_hand_written_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        allowed = {
            (old, new)
            for old, new in itertools.product(STATUSES, STATUSES)
            if conn.execute("SELECT inferq.transition_allowed(%s, %s)", (old, new)).fetchone()
            == (True,)
        }
    assert allowed == LEGAL


def test_python_table_is_the_hand_written_table() -> None:
    allowed = {
        (old.value, new.value)
        for old, new in itertools.product(TaskStatus, TaskStatus)
        if transition_allowed(old, new)
    }
    assert allowed == LEGAL
