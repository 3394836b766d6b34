"""wait_until and eventually: the value they return, their deadline and what they say at it."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from inferq.bench.polling import eventually, wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: {"n": n} if (n := next(calls)) >= 3 else None, 5) == {"n": 3}


def test_wait_until_names_what_it_waited_for_at_the_deadline() -> None:
    with pytest.raises(TimeoutError, match=r"after 0\.05s waiting for the moon"):
        wait_until(lambda: False, 0.05, "the moon")


def test_wait_until_lets_the_predicate_fail_at_once() -> None:
    def exploded() -> bool:
        raise RuntimeError("it exited")

    with pytest.raises(RuntimeError, match="it exited"):
        wait_until(exploded, 30)


async def test_eventually_takes_sync_and_async_predicates() -> None:
    calls = itertools.count(1)

    async def third() -> int:
        n = next(calls)
        return n if n >= 3 else 0

    assert await eventually(third, 5) == 3
    assert await eventually(lambda: "ready", 5) == "ready"


async def test_eventually_says_what_was_seen_last_at_the_deadline() -> None:
    seen = 0

    def count() -> bool:
        nonlocal seen
        seen += 1
        return False

    with pytest.raises(TimeoutError, match=r"waiting for 10 calls \(saw [1-9][0-9]*\)"):
        await eventually(count, 0.05, lambda: f"10 calls (saw {seen})")


async def test_eventually_with_changed_rechecks_on_each_signal_only() -> None:
    changed = asyncio.Event()
    state = {"value": 0}
    checks = 0

    def done() -> bool:
        nonlocal checks
        checks += 1
        return state["value"] == 2

    async def change() -> None:
        for value in (1, 2):
            await asyncio.sleep(0.05)  # five polling periods: a poll would check again
            state["value"] = value
            changed.set()

    writer = asyncio.create_task(change())
    assert await eventually(done, 5, changed=changed) is True
    await writer
    assert checks <= 3  # the first check and one per signal, no polling in between


async def test_eventually_with_changed_still_ends_at_the_deadline() -> None:
    with pytest.raises(TimeoutError, match="a signal"):
        await eventually(lambda: False, 0.05, "a signal", changed=asyncio.Event())
