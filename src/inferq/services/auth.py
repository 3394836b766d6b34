"""Authenticator: bearer secrets to live tokens, with an in-process cache; roles and pools.

The cache maps the secret's hash to the token for ``ttl_s`` (a safety net); a revocation is
usually seen at once, because the listener calls ``invalidate(token_id)`` on the TOKEN
notification and ``clear()`` after each reconnect (notifications sent while it was away are
lost). Unknown secrets are never cached, so guessing cannot grow memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from uuid import UUID

import structlog

from inferq.db.tokens import TokenRepository, hash_token
from inferq.domain.records import ApiToken
from inferq.errors import Forbidden, Unauthorized

_MAX_SECRET_CHARS = 512


class Authenticator:
    """Resolves bearer secrets to live tokens."""

    def __init__(
        self,
        tokens: TokenRepository,
        *,
        ttl_s: float = 30.0,
        max_entries: int = 10_000,
        generation: Callable[[], int] | None = None,
    ) -> None:
        self.tokens = tokens
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # The listener's reconnect count: revocations sent while it was away are lost, so
        # the cache is dropped whenever it changes.
        self.generation = generation or (lambda: 0)
        self._generation = 0
        self._cache: dict[bytes, tuple[ApiToken, float]] = {}

    async def authenticate(self, authorization: str | None) -> ApiToken:
        """The live token named by an ``Authorization`` header; raises Unauthorized."""
        if not authorization:
            raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("malformed Authorization header: expected `Bearer <token>`")
        if len(secret) > _MAX_SECRET_CHARS or not secret.isascii() or not secret.isprintable():
            raise Unauthorized("malformed bearer token")
        key = hash_token(secret)
        now = time.monotonic()
        generation = self.generation()
        if generation != self._generation:
            self._generation = generation
            self._cache.clear()
        cached = self._cache.get(key)
        if cached is not None and now - cached[1] < self.ttl_s:
            return cached[0]
        token = await self.tokens.find(secret)
        if token is None:
            self._cache.pop(key, None)
            raise Unauthorized("invalid or revoked bearer token")
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (token, now)
        return token

    def invalidate(self, token_id: UUID | str) -> None:
        """Forget a revoked token (called from the listener's token callback)."""
        wanted = str(token_id)
        for key, (token, _) in list(self._cache.items()):
            if str(token.id) == wanted:
                del self._cache[key]

    def clear(self) -> None:
        self._cache.clear()


class Role:
    """The roles a route accepts (admin always may), checked by ``authorize``."""

    __slots__ = ("allowed", "names")

    def __init__(self, *roles: str) -> None:
        self.allowed = frozenset((*roles, "admin"))
        self.names = " or ".join(sorted(self.allowed))

    async def authorize(self, auth: Authenticator, authorization: str | None) -> ApiToken:
        """The caller's token, which must have one of the roles; raises Unauthorized,
        Forbidden."""
        token = await auth.authenticate(authorization)
        # Every log line of the request names who made it (the task's uvicorn context is
        # per request, so this cannot leak into another one).
        structlog.contextvars.bind_contextvars(owner=token.owner_id, token_id=str(token.id))
        if token.role not in self.allowed:
            raise Forbidden(f"a {token.role} token may not use this route; it needs {self.names}")
        return token


CLIENT = Role("client")
WORKER = Role("worker")
ADMIN = Role("admin")


def check_pools(token: ApiToken, pools: Iterable[str]) -> None:
    """Raise Forbidden unless the worker token may serve every pool in ``pools``."""
    refused = [p for p in pools if not token.may_serve(p)]
    if refused:
        raise Forbidden(
            f"this worker token may not serve pool(s) {', '.join(refused)}; "
            f"it serves {', '.join(token.pools or [])}"
        )
