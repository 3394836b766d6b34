"""AdminService: the LLM registry, API tokens and the queue statistics, for admin tokens."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from inferq.db.stats import StatsRepository
from inferq.db.tokens import TokenRepository
from inferq.domain.records import ApiToken, Llm, QueueStats, Role
from inferq.errors import InvalidRequest, TokenNotFound
from inferq.services.auth import Authenticator
from inferq.services.registry import Registry


class AdminService:
    """One per replica; every method is for admin tokens (the route checks the role)."""

    def __init__(
        self,
        registry: Registry,
        tokens: TokenRepository,
        stats: StatsRepository,
        auth: Authenticator,
    ) -> None:
        self.registry = registry
        self.tokens = tokens
        self.stats = stats
        self.auth = auth

    async def llms(self) -> list[Llm]:
        return await self.registry.all()

    async def put_llm(
        self,
        name: str,
        pool: str,
        model: str | None,
        tier: str,
        *,
        max_tokens: int | None = None,
        max_n: int | None = None,
    ) -> Llm:
        """Add or replace a model (with its caps on a request's `max_tokens` and `n`; None:
        the replica's defaults); queued tasks keep the routing they were enqueued with."""
        return await self.registry.put(name, pool, model, tier, max_tokens=max_tokens, max_n=max_n)

    async def remove_llm(self, name: str) -> None:
        """Raises UnknownModel when there is no such model."""
        await self.registry.remove(name)

    async def token_list(self) -> list[ApiToken]:
        return await self.tokens.all()

    async def create_token(
        self, owner: str, role: Role, pools: Sequence[str] | None, label: str | None
    ) -> tuple[ApiToken, str]:
        """A new token and its secret (shown once). An empty pool list is refused: stored as
        NULL it would silently mean every pool."""
        if pools is not None and not pools:
            raise InvalidRequest(
                "pools: name at least one pool, or send null for a token that serves every pool",
                param="pools",
            )
        return await self.tokens.create(owner, role, pools=pools, label=label)

    async def revoke_token(self, token_id: UUID) -> None:
        """Revoke at once on this replica (the others on the notification); raises
        TokenNotFound for an unknown or already revoked token."""
        if not await self.tokens.revoke(token_id):
            raise TokenNotFound(f"token {token_id} does not exist or is already revoked")
        self.auth.invalidate(token_id)

    async def queue(self) -> QueueStats:
        return await self.stats.queue()
