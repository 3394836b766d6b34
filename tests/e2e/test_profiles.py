"""The e2e load profile: the environment may enlarge a run, never quietly shrink it."""

from __future__ import annotations

import pytest

from tests.e2e.loadgen import KINDS
from tests.e2e.profiles import DEFAULT_TASKS, ProfileRefused, from_env, summary


def test_an_empty_environment_gives_the_default_profile() -> None:
    profile = from_env({})
    assert (profile.tasks, profile.kinds) == (DEFAULT_TASKS, KINDS)
    assert summary({}) == (
        f"inferq e2e load profile: tasks={DEFAULT_TASKS} (default), kinds={','.join(KINDS)} (all)"
    )


def test_more_tasks_enlarge_the_run() -> None:
    assert from_env({"INFERQ_E2E_TASKS": "5000", "CI": "true"}).tasks == 5000


@pytest.mark.parametrize("env", [{}, {"CI": "true"}])
def test_fewer_tasks_are_refused_everywhere(env: dict[str, str]) -> None:
    with pytest.raises(ProfileRefused, match="INFERQ_E2E_TASKS=50 would shrink"):
        from_env({**env, "INFERQ_E2E_TASKS": "50"})
    assert "REFUSED" in summary({**env, "INFERQ_E2E_TASKS": "50"})


def test_a_restricted_mix_is_refused_in_ci_and_flagged_elsewhere() -> None:
    with pytest.raises(ProfileRefused, match="refused in CI"):
        from_env({"INFERQ_E2E_KINDS": "chat", "CI": "1"})
    local = from_env({"INFERQ_E2E_KINDS": "chat"})
    assert local.kinds == ("chat",)
    assert "RESTRICTED by INFERQ_E2E_KINDS" in local.describe()


def test_unknown_kinds_and_garbage_are_refused() -> None:
    with pytest.raises(ProfileRefused, match="unknown kinds"):
        from_env({"INFERQ_E2E_KINDS": "chat,chit"})
    with pytest.raises(ProfileRefused, match="not a number"):
        from_env({"INFERQ_E2E_TASKS": "lots"})
