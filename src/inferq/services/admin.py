"""AdminService: the LLM registry, API tokens (and their lanes, priorities and weights), the
queue statistics and the tasks of every owner, for admin tokens."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from inferq.db.stats import StatsRepository
from inferq.db.tokens import TokenRepository
from inferq.domain.lanes import LanePolicy
from inferq.domain.records import ApiToken, Llm, Page, QueueStats, Role
from inferq.domain.task import TaskStatus
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
        self,
        owner: str,
        role: Role,
        pools: Sequence[str] | None,
        label: str | None,
        policy: LanePolicy | None = None,
    ) -> tuple[ApiToken, str]:
        """A new token and its secret (shown once). An empty pool list is refused: stored as
        NULL it would silently mean every pool. Raises InvalidValue for a priority range
        upside down."""
        if pools is not None and not pools:
            raise InvalidRequest(
                "pools: name at least one pool, or send null for a token that serves every pool",
                param="pools",
            )
        return await self.tokens.create(owner, role, pools=pools, label=label, policy=policy)

    async def update_token(
        self,
        token_id: UUID,
        *,
        lanes: Sequence[str] | None = None,
        priority_min: int | None = None,
        priority_max: int | None = None,
        weight: int | None = None,
    ) -> ApiToken:
        """Change a live token's lanes, priority range or weight (None: unchanged). This
        replica uses the change at once, the others within their token cache's lifetime.
        Raises TokenNotFound, InvalidValue (a priority range upside down)."""
        token = await self.tokens.update_policy(
            token_id,
            lanes=lanes,
            priority_min=priority_min,
            priority_max=priority_max,
            weight=weight,
        )
        if token is None:
            raise TokenNotFound(f"token {token_id} does not exist or is revoked")
        self.auth.clear()
        return token

    async def list_tasks(
        self,
        *,
        owner: str | None = None,
        pool: str | None = None,
        lane: str | None = None,
        statuses: Sequence[TaskStatus] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Tasks of every owner, newest first, filtered; raises InvalidRequest for a foreign
        cursor."""
        try:
            return await self.stats.list_tasks(
                owner_id=owner,
                pool_name=pool,
                lane=lane,
                statuses=statuses,
                limit=limit,
                cursor=cursor,
            )
        except ValueError:
            raise InvalidRequest(
                "invalid cursor; pass next_cursor as given", param="cursor"
            ) from None

    async def revoke_token(self, token_id: UUID) -> None:
        """Revoke at once on this replica (the others on the notification); raises
        TokenNotFound for an unknown or already revoked token."""
        if not await self.tokens.revoke(token_id):
            raise TokenNotFound(f"token {token_id} does not exist or is already revoked")
        self.auth.invalidate(token_id)

    async def queue(self) -> QueueStats:
        return await self.stats.queue()
