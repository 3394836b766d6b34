"""The e2e audit trail of inferq.task: every change with its OLD and NEW values, in commit order.

A statement-level trigger (schema ``e2e_audit``, created by the tests, never part of inferq)
records one row per task whose status, attempt, holder (``claimed_by``) or response changed:
the OLD and NEW of each, and of the response the writer it names (the echo backend's
``system_fingerprint``, ``fp_echo_<task id hex>_<attempt>``). From it the checker verifies
fencing (I5) and counts terminal transitions (I2) from the database itself, not from what
clients happened to see.

Commit order: ``n`` comes from a sequence, drawn when the row is written, not when its
transaction commits. For one task that is commit order anyway (its row lock serializes the
writes). For one worker session the trigger makes it so: before writing, it takes a
transaction-scoped advisory lock per session the statement touches (in key order, so two
statements never wait on each other crosswise) and holds it to the commit, so of two
transactions that change what one session holds, the second draws its numbers after the first
committed. The lock is taken after the statement did its work (an AFTER trigger), so it orders
commits without changing what any statement saw or wrote: a claim that overshoots a session's
capacity still does, and shows up in ``most_held``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

HELD = frozenset({"claimed", "running"})

# Two-integer advisory keys live apart from the one-bigint keys inferq uses (migrations).
AUDIT_LOCK_CLASS = 0xE2E

AUDIT_SQL = f"""
CREATE SCHEMA IF NOT EXISTS e2e_audit;
CREATE TABLE IF NOT EXISTS e2e_audit.transition (
    n              bigserial PRIMARY KEY,
    xact           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    task_id        uuid NOT NULL,
    old_status     text,
    new_status     text NOT NULL,
    old_attempt    integer,
    new_attempt    integer NOT NULL,
    old_claimed_by uuid,
    new_claimed_by uuid,
    old_writer     text,
    new_writer     text,
    at             timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION e2e_audit.record_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO e2e_audit.transition
        (task_id, new_status, new_attempt, new_claimed_by, new_writer)
    SELECT id, status, attempt, claimed_by, response_body->>'system_fingerprint'
    FROM new_rows;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE FUNCTION e2e_audit.record_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    key integer;
BEGIN
    FOR key IN
        SELECT DISTINCT hashtext(s::text) AS k
        FROM old_rows o JOIN new_rows n USING (id),
             LATERAL (VALUES (o.claimed_by), (n.claimed_by)) AS v(s)
        WHERE s IS NOT NULL
          AND (o.status, o.attempt, o.claimed_by, o.response_body)
              IS DISTINCT FROM (n.status, n.attempt, n.claimed_by, n.response_body)
        ORDER BY k
    LOOP
        PERFORM pg_advisory_xact_lock({AUDIT_LOCK_CLASS}, key);
    END LOOP;
    INSERT INTO e2e_audit.transition
        (task_id, old_status, new_status, old_attempt, new_attempt, old_claimed_by,
         new_claimed_by, old_writer, new_writer)
    SELECT n.id, o.status, n.status, o.attempt, n.attempt, o.claimed_by, n.claimed_by,
           o.response_body->>'system_fingerprint', n.response_body->>'system_fingerprint'
    FROM old_rows o JOIN new_rows n USING (id)
    WHERE (o.status, o.attempt, o.claimed_by, o.response_body)
          IS DISTINCT FROM (n.status, n.attempt, n.claimed_by, n.response_body);
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS e2e_audit_insert ON inferq.task;
CREATE TRIGGER e2e_audit_insert AFTER INSERT ON inferq.task
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2e_audit.record_insert();
DROP TRIGGER IF EXISTS e2e_audit_update ON inferq.task;
CREATE TRIGGER e2e_audit_update AFTER UPDATE ON inferq.task
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2e_audit.record_update();
"""


@dataclass(frozen=True)
class Transition:
    """One audited change of one task: OLD and NEW values (OLD ones are None on insert)."""

    n: int
    xact: int
    task_id: str
    old_status: str | None
    new_status: str
    old_attempt: int | None
    new_attempt: int
    old_by: str | None
    new_by: str | None
    old_writer: str | None = None
    new_writer: str | None = None


def install(dsn: str) -> None:
    """Create the audit schema and triggers in the (migrated) database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(AUDIT_SQL)


def read(dsn: str) -> list[Transition]:
    """Every audited transition, in ``n`` order."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT n, xact::text::bigint, task_id::text, old_status, new_status, old_attempt,"
            " new_attempt, old_claimed_by::text, new_claimed_by::text, old_writer, new_writer"
            " FROM e2e_audit.transition ORDER BY n"
        ).fetchall()
    return [Transition(*row) for row in rows]


def by_task(transitions: Iterable[Transition]) -> dict[str, list[Transition]]:
    """The transitions of each task, in commit order."""
    trails: dict[str, list[Transition]] = defaultdict(list)
    for t in sorted(transitions, key=lambda t: t.n):
        trails[t.task_id].append(t)
    return trails


def most_held(transitions: Iterable[Transition]) -> dict[str, int]:
    """The most tasks each worker session held (claimed or running) at once.

    A task is held from the commit of its claim to the commit of whatever ended the hold
    (complete, fail, cancel, revert). The transitions of one session are in commit order (see
    the module docstring); the changes of one transaction count as one step."""
    steps: dict[str, dict[int, int]] = defaultdict(dict)  # session -> xact -> delta, in order
    for t in sorted(transitions, key=lambda t: t.n):
        if t.old_status in HELD and t.old_by is not None:
            delta = steps[t.old_by]
            delta[t.xact] = delta.get(t.xact, 0) - 1
        if t.new_status in HELD and t.new_by is not None:
            delta = steps[t.new_by]
            delta[t.xact] = delta.get(t.xact, 0) + 1
    peaks: dict[str, int] = {}
    for session, deltas in steps.items():
        held = peak = 0
        for change in deltas.values():  # dicts keep insertion order: commit order
            held += change
            peak = max(peak, held)
        peaks[session] = peak
    return peaks
