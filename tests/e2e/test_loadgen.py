"""The load generator's admission: operations past the admitted share wait for a later call.

No deployment: the operations are replaced by a recorder, so only the numbering, the hold and
the progress counters are exercised.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.loadgen import History, LoadGenerator, Profile


class RecordingLoad(LoadGenerator):
    """A LoadGenerator whose operations only record that they started."""

    def __init__(self, tmp_path: Path, tasks: int) -> None:
        history = History(tmp_path / "history.jsonl")
        super().__init__(
            "http://127.0.0.1:9", "token", history, Profile(tasks=tasks, concurrency=3)
        )
        self.started: list[int] = []

    async def _one(self, n: int) -> None:
        self.started.append(n)


async def test_operations_past_the_admitted_share_wait_until_admitted(tmp_path: Path) -> None:
    gen = RecordingLoad(tmp_path, tasks=10)
    await gen.admit_until(0.4)
    load = asyncio.create_task(gen.run())
    await gen.reached(0.4)
    # The first four ran; the clients that took the next numbers wait at the hold.
    assert sorted(gen.started) == [0, 1, 2, 3]
    assert gen.out_of_work
    await gen.admit_until(1.0)
    await load
    assert sorted(gen.started) == list(range(10))
    assert gen.out_of_work
    gen.history.close()


async def test_without_a_hold_every_operation_runs(tmp_path: Path) -> None:
    gen = RecordingLoad(tmp_path, tasks=7)
    assert not gen.out_of_work
    await gen.run()
    assert sorted(gen.started) == list(range(7))
    assert gen.out_of_work
    gen.history.close()
