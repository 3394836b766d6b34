"""ChunkStream: seqs in order, one post in flight, chunks emitted meanwhile go in the next post."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from inferq.wire import JsonValue
from inferq.worker import ChunkStream


async def test_chunks_emitted_during_a_post_go_in_the_next_one() -> None:
    posts: list[list[int]] = []
    release = asyncio.Event()
    in_flight = asyncio.Event()

    async def send(batch: Sequence[tuple[int, JsonValue]]) -> int:
        posts.append([seq for seq, _ in batch])
        in_flight.set()
        await release.wait()
        return batch[-1][0]

    stream = ChunkStream(send)
    flusher = asyncio.create_task(stream.run())
    stream.emit({"n": 1})
    await in_flight.wait()
    for n in range(2, 11):
        stream.emit({"n": n})
    stream.close()
    release.set()
    await flusher
    assert posts == [[1], list(range(2, 11))]
    assert stream.posted_seq == 10


async def test_batches_are_capped_and_ordered() -> None:
    seen: list[tuple[int, JsonValue]] = []

    async def send(batch: Sequence[tuple[int, JsonValue]]) -> int:
        seen.extend(batch)
        return batch[-1][0]

    stream = ChunkStream(send, max_batch=3)
    for n in range(1, 8):
        stream.emit(n)
    stream.close()
    await stream.run()
    assert seen == [(n, n) for n in range(1, 8)]
    assert stream.posts == 3


async def test_nothing_is_posted_before_the_gate_opens() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    posted: list[int] = []

    async def send(batch: Sequence[tuple[int, JsonValue]]) -> int:
        posted.extend(seq for seq, _ in batch)
        return batch[-1][0]

    stream = ChunkStream(send)
    flusher = asyncio.create_task(stream.run(gate))
    stream.emit("a")
    stream.emit("b")
    stream.close()
    await asyncio.sleep(0)
    assert posted == []
    gate.set_result(None)
    await flusher
    assert posted == [1, 2]


async def test_a_rejected_post_ends_the_stream_with_the_error() -> None:
    async def send(batch: Sequence[tuple[int, JsonValue]]) -> int:
        raise RuntimeError("409")

    stream = ChunkStream(send)
    stream.emit("x")
    with pytest.raises(RuntimeError, match="409"):
        await stream.run()
