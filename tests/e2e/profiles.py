"""The size of the e2e load runs, from INFERQ_E2E_TASKS and INFERQ_E2E_KINDS: never quietly less.

Both variables used to shrink a run without a word, so an environment left over from a debugging
session could make the suite prove far less than it says. The rules now:

- ``INFERQ_E2E_TASKS`` (logical operations per test) may only enlarge the run: a value below
  ``DEFAULT_TASKS`` is refused (test_faults.py fails to import, naming the variable). For a
  quicker run, pick fewer tests (``-k``), not smaller ones.
- ``INFERQ_E2E_KINDS`` (restrict the mix of operations, a debugging aid) is refused when ``CI`` is
  set, and marked RESTRICTED in the profile line otherwise.
- The profile in use is printed at the end of every run that loads the e2e suite (its
  conftest's terminal summary) and stored in each load test's report.json.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tests.e2e.loadgen import KINDS

DEFAULT_TASKS = 300


class ProfileRefused(ValueError):
    """The environment asks for a smaller e2e run than the rules allow."""


@dataclass(frozen=True)
class E2eProfile:
    """How much load each e2e fault test drives."""

    tasks: int = DEFAULT_TASKS
    kinds: tuple[str, ...] = KINDS

    @property
    def restricted(self) -> bool:
        return set(self.kinds) != set(KINDS)

    def describe(self) -> str:
        size = "default" if self.tasks == DEFAULT_TASKS else "enlarged by INFERQ_E2E_TASKS"
        mix = "all" if not self.restricted else "RESTRICTED by INFERQ_E2E_KINDS"
        return f"tasks={self.tasks} ({size}), kinds={','.join(self.kinds)} ({mix})"


def from_env(environ: Mapping[str, str] = os.environ) -> E2eProfile:
    """The profile ``environ`` asks for; raises ProfileRefused when it would shrink the run
    (see the module docstring)."""
    raw = environ.get("INFERQ_E2E_TASKS", "").strip()
    try:
        tasks = int(raw) if raw else DEFAULT_TASKS
    except ValueError:
        raise ProfileRefused(f"INFERQ_E2E_TASKS={raw!r} is not a number") from None
    if tasks < DEFAULT_TASKS:
        raise ProfileRefused(
            f"INFERQ_E2E_TASKS={tasks} would shrink the e2e run below its default of "
            f"{DEFAULT_TASKS}; it may only enlarge it (select fewer tests with -k instead)"
        )
    kinds = tuple(k.strip() for k in environ.get("INFERQ_E2E_KINDS", "").split(",") if k.strip())
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ProfileRefused(f"INFERQ_E2E_KINDS names unknown kinds {sorted(unknown)}")
    profile = E2eProfile(tasks, kinds or KINDS)
    if profile.restricted and environ.get("CI", "").lower() not in ("", "0", "false"):
        raise ProfileRefused(
            f"INFERQ_E2E_KINDS={','.join(kinds)} restricts the e2e mix; refused in CI"
        )
    return profile


def summary(environ: Mapping[str, str] = os.environ) -> str:
    """One line naming the profile ``environ`` gives, or why it is refused."""
    try:
        return f"inferq e2e load profile: {from_env(environ).describe()}"
    except ProfileRefused as exc:
        return f"inferq e2e load profile REFUSED: {exc}"
