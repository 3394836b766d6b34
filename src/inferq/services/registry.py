"""Registry: the LLM registry (model name -> pool), with a short per-replica cache."""

from __future__ import annotations

import time

from inferq.db.llms import LlmRepository
from inferq.domain.records import Llm
from inferq.errors import UnknownModel

CACHE_S = 1.0


class Registry:
    """Resolves model names for submits (cached ``CACHE_S``); edits drop the cached entry.

    Another replica's edit is seen within ``CACHE_S``; queued tasks keep the routing they
    were enqueued with whatever happens to the entry later.
    """

    def __init__(self, llms: LlmRepository) -> None:
        self.llms = llms
        self._cache: dict[str, tuple[Llm, float]] = {}

    async def resolve(self, name: str) -> Llm:
        """The entry for ``name``; raises UnknownModel."""
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and now - cached[1] < CACHE_S:
            return cached[0]
        llm = await self.llms.resolve(name)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (llm, now)
        return llm

    async def all(self) -> list[Llm]:
        return await self.llms.all()

    async def put(
        self,
        name: str,
        pool: str,
        model: str | None,
        tier: str,
        *,
        max_tokens: int | None = None,
        max_n: int | None = None,
    ) -> Llm:
        llm = await self.llms.put(name, pool, model, tier, max_tokens=max_tokens, max_n=max_n)
        self._cache.pop(llm.name, None)
        return llm

    async def remove(self, name: str) -> None:
        """Remove an entry; raises UnknownModel when there is none."""
        self._cache.pop(name, None)
        if not await self.llms.remove(name):
            raise UnknownModel(f"model {name!r} does not exist")
