"""Feed: the dashboard's shared, coalesced refresh (no database: a counting reader)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable
from uuid import uuid4

from inferq.bench.polling import eventually
from inferq.services.feed import Feed
from inferq.wakeups import Hub


class Reader:
    def __init__(self) -> None:
        self.reads: list[Hashable] = []

    async def __call__(self, key: Hashable) -> str:
        self.reads.append(key)
        return f"{key}#{len(self.reads)}"


async def test_many_pages_on_one_topic_share_one_read_per_change() -> None:
    hub, reader = Hub(), Reader()
    feed = Feed(hub, reader, min_gap_s=0.05, refresh_s=60)
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(feed.subscribe("overview")) for _ in range(20)]
        firsts = await asyncio.gather(*(s.next() for s in subs))
        assert len(reader.reads) == 1 and len(set(firsts)) == 1
        # A storm of notifications: a few reads at most, never one per page or per change.
        for _ in range(500):
            hub.noticed("tasks")
        seconds = await asyncio.gather(*(s.next() for s in subs))
        assert len(set(seconds)) == 1 and seconds[0] != firsts[0]
        await asyncio.sleep(0.2)
        assert 2 <= len(reader.reads) <= 3, reader.reads


async def test_only_the_topics_a_change_affects_are_read() -> None:
    hub, reader = Hub(), Reader()
    feed = Feed(hub, reader, min_gap_s=0.01, refresh_s=60)
    async with feed.subscribe("batches") as batches, feed.subscribe("workers") as workers:
        await batches.next()
        await workers.next()
        reader.reads.clear()
        hub.noticed("sessions")
        await workers.next()
        assert reader.reads == ["workers"]
        hub.noticed("batches")
        await batches.next()
        assert reader.reads == ["workers", "batches"]
        # A task's status change is noticed through the Hub's usual entry point.
        hub.task_changed(uuid4(), "pending", "p1")
        await eventually(lambda: len(reader.reads) == 4, timeout_s=2)
        assert sorted(map(str, reader.reads[2:])) == ["batches", "workers"]


async def test_a_topic_nobody_watches_is_never_read() -> None:
    hub, reader = Hub(), Reader()
    feed = Feed(hub, reader, min_gap_s=0.01, refresh_s=0.05)
    async with feed.subscribe("owners") as owners:
        await owners.next()
    hub.noticed("tasks")
    await asyncio.sleep(0.2)
    assert reader.reads == ["owners"]


async def test_watched_topics_are_refreshed_without_any_change() -> None:
    hub, reader = Hub(), Reader()
    feed = Feed(hub, reader, min_gap_s=0.01, refresh_s=0.05)
    async with feed.subscribe("workers") as workers:
        first = await workers.next()
        assert await asyncio.wait_for(workers.next(), 2) != first


async def test_the_loop_ends_with_the_last_page() -> None:
    feed = Feed(Hub(), Reader(), min_gap_s=0.01, refresh_s=60)
    async with feed.subscribe("workers") as workers:
        await workers.next()
    assert feed._task is not None
    await asyncio.wait_for(feed._task, 1)


async def test_the_slow_owners_topic_shows_a_revoked_token_at_once() -> None:
    hub, reader = Hub(), Reader()
    feed = Feed(hub, reader, min_gap_s=0.01, slow_gap_s=60, refresh_s=60)
    async with feed.subscribe("owners") as owners:
        await owners.next()
        hub.noticed("tasks")  # within the slow gap: waits
        await asyncio.sleep(0.1)
        assert reader.reads == ["owners"]
        hub.noticed("tokens")
        await asyncio.wait_for(owners.next(), 1)
        assert reader.reads == ["owners", "owners"]
