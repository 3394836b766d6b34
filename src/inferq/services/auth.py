"""Authenticator: bearer secrets to live tokens, with an in-process cache; roles and pools.

The cache maps the secret's hash to the token for ``ttl_s`` (a safety net). A revocation takes
effect on a replica through ``revoked(token_id)``, which drops the token from the cache and
tells the subscribers (the Drain, which ends the token's open waits and streams). It is called
by the listener on the TOKEN notification (milliseconds), by the replica's own revocation poll
(inferq.services.revocations, every INFERQ_REVOCATION_POLL_S: the only way in poll-only mode,
and the backstop while the listener is away), and by the admin route that revoked it. The
cache is also dropped after each listener reconnect (notifications sent while it was away
are lost). Unknown secrets are never cached, so guessing cannot grow memory.

A lookup in flight cannot resurrect a revoked token: ``revoked()`` counts revocations, and a
lookup caches its answer only when no revocation arrived while it ran; a token revoked during
its own lookup is refused outright (the recently revoked ids are remembered a while).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from uuid import UUID

import structlog

from inferq.db.tokens import TokenRepository, hash_token
from inferq.domain.records import ApiToken
from inferq.errors import Forbidden, TokenRevoked, Unauthorized

_MAX_SECRET_CHARS = 512
# How long a revoked id is remembered: longer than any lookup, and than the poll's window.
REMEMBER_REVOKED_S = 300.0


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
        self.revocations = 0  # revocations seen by this replica
        self._revoked: dict[UUID, float] = {}  # recently revoked ids -> when seen
        self._subscribers: list[Callable[[UUID], None]] = []

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
        revocations = self.revocations
        token = await self.tokens.find(secret)
        if token is None:
            self._cache.pop(key, None)
            raise Unauthorized("invalid or revoked bearer token")
        if self.revocations != revocations:
            # A revocation arrived while the row was read: the row may predate it.
            if token.id in self._revoked:
                raise TokenRevoked("this token was revoked")
            return token  # answered, not cached
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (token, now)
        return token

    def subscribe(self, callback: Callable[[UUID], None]) -> None:
        """Call ``callback(token_id)`` on every revocation this replica learns of."""
        self._subscribers.append(callback)

    def is_revoked(self, token_id: UUID) -> bool:
        """Whether this replica learnt of the token's revocation recently."""
        return token_id in self._revoked

    def revoked(self, token_id: UUID | str) -> bool:
        """The token was revoked: forget it, end what it holds open. False when this replica
        already knew (the poll sees a revocation more than once)."""
        tid = token_id if isinstance(token_id, UUID) else UUID(str(token_id))
        if tid in self._revoked:
            return False
        now = time.monotonic()
        self.revocations += 1
        self._revoked[tid] = now
        if len(self._revoked) > 1000:
            self._revoked = {
                t: at for t, at in self._revoked.items() if now - at < REMEMBER_REVOKED_S
            }
        for key, (token, _) in list(self._cache.items()):
            if token.id == tid:
                del self._cache[key]
        for callback in self._subscribers:
            callback(tid)
        return True

    def invalidate(self, token_id: UUID | str) -> None:
        """Forget a revoked token (the listener's token callback): see ``revoked``."""
        self.revoked(token_id)

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
