"""The transition table in Python agrees with the database's transition_allowed()."""

from inferq.domain.task import TERMINAL, TRANSITIONS, TaskStatus, transition_allowed


def test_terminal_states_have_no_way_out() -> None:
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
        assert status.terminal


def test_pending_can_only_be_claimed_cancelled_or_expired() -> None:
    allowed = {s for s in TaskStatus if transition_allowed(TaskStatus.PENDING, s)}
    assert allowed == {TaskStatus.CLAIMED, TaskStatus.CANCELLED, TaskStatus.ERROR}
