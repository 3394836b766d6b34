"""e2e fixtures: a fresh Deployment per test, whose logs are kept when the test fails."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from tests.e2e import profiles
from tests.e2e.harness import Deployment
from tests.e2e.procs import Stack


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the e2e load profile of the run, so a shrunk or enlarged one is never silent."""
    terminalreporter.write_line(profiles.summary())


@pytest.fixture
def failed(request: pytest.FixtureRequest) -> Callable[[], bool]:
    """Whether the current test has failed (read at teardown)."""
    return lambda: request.node.stash.get(_FAILED, False)


@pytest.fixture
def deployment(failed: Callable[[], bool]) -> Iterator[Deployment]:
    """PostgreSQL, three replicas behind nginx and four echo workers, all started and ready."""
    with Deployment.running(failed) as dep:
        yield dep


@pytest.fixture
def stack(dsn: str, failed: Callable[[], bool]) -> Iterator[Stack]:
    """One `inferq serve` on a fresh database, with tokens and a model; workers on demand.
    When the test fails, the tail of every process's log is printed with its report."""
    s = Stack(dsn).start()
    try:
        yield s
    finally:
        s.stop()
        if failed():
            for proc in s.procs:
                tail = proc.log_text().splitlines()[-80:]
                print(f"--- {proc.log} (last {len(tail)} lines)", *tail, sep="\n")
