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
from inferq.domain.lanes import LanePolicy
from inferq.domain.records import ApiToken, Role

TOKEN_PREFIX = "iq_"


_COLUMNS = sql.SQL(
    "id, owner_id, role, pools, label, created_at, revoked_at, "
    "lanes, priority_min, priority_max, weight"
)

# An owner's weight in every lane it queued in: the largest of its live tokens' (1 with none).
# Rows are locked in key order, as the claim locks them, so the two never deadlock.
_SYNC_WEIGHT = """
WITH w AS (
    SELECT coalesce(max(weight), 1) AS weight FROM inferq.api_token
    WHERE owner_id = %(owner)s AND revoked_at IS NULL
), locked AS (
    SELECT f.pool_name, f.lane, f.owner_id FROM inferq.fair_share f
    WHERE f.owner_id = %(owner)s AND f.weight <> (SELECT weight FROM w)
    ORDER BY f.pool_name, f.lane, f.owner_id
    FOR UPDATE
)
UPDATE inferq.fair_share f SET weight = (SELECT weight FROM w)
FROM locked l
WHERE (f.pool_name, f.lane, f.owner_id) = (l.pool_name, l.lane, l.owner_id)
"""

_UPDATE_POLICY = sql.SQL(
    """
UPDATE inferq.api_token SET
    lanes = coalesce(%(lanes)s, lanes),
    priority_min = coalesce(%(priority_min)s, priority_min),
    priority_max = coalesce(%(priority_max)s, priority_max),
    weight = coalesce(%(weight)s, weight)
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING {}
"""
).format(_COLUMNS)


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
        policy: LanePolicy | None = None,
    ) -> tuple[ApiToken, str]:
        """A new token and its secret; the secret is shown once and never stored.

        ``pools=None`` lets a worker token serve every pool. An empty list is refused with
        ValueError: stored as NULL it would silently mean every pool.
        """
        if pools is not None and not pools:
            raise ValueError("a token's pool list needs at least one pool; omit it for every pool")
        secret = new_secret()
        policy = policy or LanePolicy()
        async with connect(self.pool) as conn, conn.transaction():
            cur = conn.cursor(row_factory=class_row(ApiToken))
            await cur.execute(
                sql.SQL(
                    "INSERT INTO inferq.api_token (token_hash, owner_id, role, pools, label, "
                    "lanes, priority_min, priority_max, weight) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {}"
                ).format(_COLUMNS),
                (
                    hash_token(secret),
                    owner_id,
                    role,
                    None if pools is None else list(pools),
                    label,
                    list(policy.lanes),
                    policy.priority_min,
                    policy.priority_max,
                    policy.weight,
                ),
            )
            token = await cur.fetchone()
            await conn.execute(_SYNC_WEIGHT, {"owner": owner_id})
        assert token is not None
        return token, secret

    async def update_policy(
        self,
        token_id: UUID,
        *,
        lanes: Sequence[str] | None = None,
        priority_min: int | None = None,
        priority_max: int | None = None,
        weight: int | None = None,
    ) -> ApiToken | None:
        """Change what a live token may ask for and its weight (None: unchanged); None when
        there is no such live token. Raises InvalidValue for values the database refuses (an
        unknown lane, an empty list, a range upside down). Replicas pick the change up when
        their token cache entry expires (INFERQ_TOKEN_CACHE_S)."""
        params = {
            "id": token_id,
            "lanes": None if lanes is None else list(lanes),
            "priority_min": priority_min,
            "priority_max": priority_max,
            "weight": weight,
        }
        async with connect(self.pool) as conn, conn.transaction():
            cur = conn.cursor(row_factory=class_row(ApiToken))
            await cur.execute(_UPDATE_POLICY, params)
            token = await cur.fetchone()
            if token is not None:
                await conn.execute(_SYNC_WEIGHT, {"owner": token.owner_id})
            return token

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
                "WHERE id = %s AND revoked_at IS NULL RETURNING owner_id",
                (token_id,),
            )
            row = await cur.fetchone()
            if row is not None:
                await conn.execute("SELECT pg_notify(%s, %s)", (channels.TOKEN, str(token_id)))
                await conn.execute(_SYNC_WEIGHT, {"owner": row[0]})
            return row is not None

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
