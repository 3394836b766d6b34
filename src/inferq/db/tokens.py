"""TokenRepository: API tokens, of which only a SHA-256 hash is stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from uuid import UUID

from psycopg import sql
from psycopg.rows import class_row

from inferq.db import channels
from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.domain.records import ApiToken, Role

TOKEN_PREFIX = "iq_"


_COLUMNS = sql.SQL("id, owner_id, role, pools, label, created_at, revoked_at")


def hash_token(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenRepository:
    """Creates, finds and revokes API tokens."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def create(
        self,
        owner_id: str,
        role: Role,
        *,
        pools: Sequence[str] | None = None,
        label: str | None = None,
    ) -> tuple[ApiToken, str]:
        """A new token and its secret; the secret is shown once and never stored.

        ``pools=None`` lets a worker token serve every pool. An empty list is refused with
        ValueError: stored as NULL it would silently mean every pool.
        """
        if pools is not None and not pools:
            raise ValueError("a token's pool list needs at least one pool; omit it for every pool")
        secret = new_secret()
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(ApiToken))
            await cur.execute(
                sql.SQL(
                    "INSERT INTO inferq.api_token (token_hash, owner_id, role, pools, label) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING {}"
                ).format(_COLUMNS),
                (hash_token(secret), owner_id, role, None if pools is None else list(pools), label),
            )
            token = await cur.fetchone()
        assert token is not None
        return token, secret

    async def find(self, secret: str) -> ApiToken | None:
        """The live token for ``secret``, or None when unknown or revoked."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(ApiToken))
            await cur.execute(
                sql.SQL(
                    "SELECT {} FROM inferq.api_token WHERE token_hash = %s AND revoked_at IS NULL"
                ).format(_COLUMNS),
                (hash_token(secret),),
            )
            return await cur.fetchone()

    async def all(self) -> list[ApiToken]:
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(ApiToken))
            await cur.execute(
                sql.SQL("SELECT {} FROM inferq.api_token ORDER BY created_at").format(_COLUMNS)
            )
            return await cur.fetchall()

    async def revoke(self, token_id: UUID) -> bool:
        """Revoke a token; replicas drop it from their caches on the TOKEN notification."""
        async with connect(self.pool) as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE inferq.api_token SET revoked_at = now() "
                "WHERE id = %s AND revoked_at IS NULL",
                (token_id,),
            )
            if cur.rowcount:
                await conn.execute("SELECT pg_notify(%s, %s)", (channels.TOKEN, str(token_id)))
            return cur.rowcount > 0

    async def recently_revoked(self, window_s: float) -> list[UUID]:
        """The tokens revoked within the last ``window_s`` (database time), for the replicas'
        revocation poll (api_token_revoked_idx, sql/0003_security.sql)."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(
                "SELECT id FROM inferq.api_token "
                "WHERE revoked_at > now() - make_interval(secs => %s)",
                (window_s,),
            )
            return [row[0] for row in await cur.fetchall()]

    async def count(self) -> int:
        async with connect(self.pool) as conn:
            cur = await conn.execute("SELECT count(*) FROM inferq.api_token")
            row = await cur.fetchone()
            return int(row[0]) if row else 0
