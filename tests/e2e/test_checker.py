"""The e2e checker itself, on synthetic histories and audits: each check it makes can fire.

No deployment: these feed ``checker.check`` a history and an audit trail written by hand, one
clean and then each with one defect, and expect exactly the invariant that names it.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from tests.e2e.audit import Transition, by_task, most_held
from tests.e2e.checker import check

TASK = str(uuid.UUID(int=0xA11CE))
WORKER_A = str(uuid.UUID(int=0xA))
WORKER_B = str(uuid.UUID(int=0xB))
LID = "000001-cafe"
TEXT = f"nonce-{LID} w0 w1"


def answer(attempt: int, task_id: str = TASK) -> dict[str, Any]:
    """What EchoBackend stores: its text, and the attempt that wrote it in the fingerprint."""
    return {
        "object": "chat.completion",
        "system_fingerprint": f"fp_echo_{uuid.UUID(task_id).hex}_{attempt}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT}}],
    }


class Trail:
    """Builds a task's audit rows as the trigger writes them: OLD and NEW of each change."""

    def __init__(self, task_id: str = TASK) -> None:
        self.task_id = task_id
        self.rows: list[Transition] = []
        self.n = itertools.count(1)
        self.status, self.attempt = "pending", 0
        self.by: str | None = None
        self.writer: str | None = None
        self.change("pending", 0, None, None, old=False)

    def change(
        self,
        status: str,
        attempt: int,
        by: str | None,
        writer: str | None,
        *,
        old: bool = True,
        xact: int | None = None,
    ) -> Trail:
        """Append a change to these NEW values; the OLD ones are the previous change's."""
        n = next(self.n)
        self.rows.append(
            Transition(
                n=n,
                xact=xact if xact is not None else n,
                task_id=self.task_id,
                old_status=self.status if old else None,
                new_status=status,
                old_attempt=self.attempt if old else None,
                new_attempt=attempt,
                old_by=self.by if old else None,
                new_by=by,
                old_writer=self.writer if old else None,
                new_writer=writer,
            )
        )
        self.status, self.attempt, self.by, self.writer = status, attempt, by, writer
        return self

    def claim(self, session: str) -> Trail:
        return self.change("claimed", self.attempt + 1, session, None)

    def start(self) -> Trail:
        return self.change("running", self.attempt, self.by, None)

    def revert(self) -> Trail:
        return self.change("pending", self.attempt, None, None)

    def complete(self, attempt: int) -> Trail:
        """Completed with an answer written by ``attempt`` (the holder's, or a stale one)."""
        writer = answer(attempt)["system_fingerprint"]
        return self.change("completed", self.attempt, self.by, writer)


def run(trail: Trail, *, client_attempt: int | None = None, **kwargs: Any) -> list[str]:
    """The violations ``check`` finds for one sync chat call whose task has ``trail``."""
    final = trail.rows[-1]
    stored = answer(int(final.new_writer.rsplit("_", 1)[1])) if final.new_writer else None
    seen = answer(client_attempt) if client_attempt else stored
    result = {
        "op": "result",
        "kind": "chat",
        "lid": LID,
        "start": 0.0,
        "end": 1.0,
        "outcome": "ok",
        "task_id": TASK,
        "status": "completed",
        "content": TEXT,
        "writer": (seen or {}).get("system_fingerprint"),
    }
    tasks = {
        TASK: {
            "status": final.new_status,
            "attempt": final.new_attempt,
            "response": stored,
            "request": {},
            "key": None,
            "error": None,
        }
    }
    return check([result], tasks, by_task(trail.rows), **kwargs).violations


def test_a_clean_rerun_passes() -> None:
    trail = Trail().claim(WORKER_A).start().revert().claim(WORKER_B).start().complete(2)
    assert run(trail) == []


def test_a_stale_worker_s_write_is_an_i5_violation() -> None:
    # A lost its lease, B re-ran the task, and A's late completion (attempt 1) was applied
    # over B's attempt 2: only the OLD values of the row show who held it.
    trail = Trail().claim(WORKER_A).start().revert().claim(WORKER_B).start().complete(1)
    violations = run(trail)
    assert any(v.startswith("I5: ") and "stale write by attempt 1 onto 2" in v for v in violations)


def test_a_write_onto_a_row_no_one_holds_is_an_i5_violation() -> None:
    trail = Trail().claim(WORKER_A).start().revert()
    trail.change("completed", 1, None, answer(1)["system_fingerprint"])
    assert any("response written onto a pending row" in v for v in run(trail))


def test_a_holder_that_did_not_claim_the_attempt_is_an_i5_violation() -> None:
    trail = Trail().claim(WORKER_A).start()
    trail.by = WORKER_B  # the row changed hands without a claim
    trail.complete(1)
    assert any("did not claim it" in v for v in run(trail))


def test_a_claim_that_does_not_advance_the_attempt_is_an_i5_violation() -> None:
    trail = Trail().claim(WORKER_A).revert()
    trail.change("claimed", 1, WORKER_B, None)
    trail.complete(1)
    assert any("claim took 1" in v for v in run(trail))


def test_a_client_given_a_stale_attempt_s_answer_is_an_i5_violation() -> None:
    trail = Trail().claim(WORKER_A).start().revert().claim(WORKER_B).start().complete(2)
    violations = run(trail, client_attempt=1)
    assert any(v.startswith("I5: ") and "client got" in v for v in violations)


def hold(n: int, task: int, change: str, *, xact: int | None = None) -> Transition:
    """Audit row ``n`` of task ``task``: WORKER_A claims it, or ends its hold (completes)."""
    claim = change == "claim"
    return Transition(
        n=n,
        xact=xact if xact is not None else n,
        task_id=str(uuid.UUID(int=task)),
        old_status="pending" if claim else "running",
        new_status="claimed" if claim else "completed",
        old_attempt=0 if claim else 1,
        new_attempt=1,
        old_by=None if claim else WORKER_A,
        new_by=WORKER_A if claim else None,
    )


def test_most_held_counts_the_tasks_a_session_held_at_once() -> None:
    # Three claims for one session commit before any of its tasks ends (two in one commit).
    rows = [hold(1, 1, "claim", xact=7), hold(2, 2, "claim", xact=7), hold(3, 3, "claim")]
    rows += [hold(4, 1, "end"), hold(5, 2, "end"), hold(6, 3, "end")]
    assert most_held(rows) == {WORKER_A: 3}
    # Ended one at a time between the claims: never more than one.
    rows = [hold(1, 1, "claim"), hold(2, 1, "end"), hold(3, 2, "claim"), hold(4, 2, "end")]
    assert most_held(rows) == {WORKER_A: 1}


def test_an_end_and_a_claim_in_one_commit_are_one_step() -> None:
    rows = [hold(1, 1, "claim"), hold(2, 2, "claim", xact=9), hold(3, 1, "end", xact=9)]
    rows.append(hold(4, 2, "end"))
    assert most_held(rows) == {WORKER_A: 1}
    # The same changes in two commits, the claim first: two held at once.
    rows[1] = hold(2, 2, "claim", xact=8)
    assert most_held(rows) == {WORKER_A: 2}
