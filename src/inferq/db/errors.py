"""The repository boundary: psycopg's errors become inferq's own, and clients never see
database text.

Every repository borrows its connections through ``connect(pool)`` (a thin wrapper over
``pool.connection()``), so what leaves ``inferq.db`` is an ``InferqError``:

- a value the schema refuses (a CHECK, a domain, a too-long text, an out-of-range number) is
  ``InvalidValue`` naming the request field when the constraint is known, with a message of
  ours; the database's own text goes to the log only;
- a database that cannot be reached, a broken connection, an administrator's shutdown, a
  cancelled statement or no free connection in time is ``DatabaseUnavailable`` (a 503: retry);
- anything else from psycopg is ``DatabaseError`` (a bug: a 500 that says to see the log).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import psycopg
import psycopg_pool
import structlog
from psycopg import AsyncConnection

from inferq.errors import DatabaseError, DatabaseUnavailable, InvalidValue, QuotaExceeded

log = structlog.get_logger(__name__)

# Constraint or domain -> (the request field, what the client is told).
_KNOWN: dict[str, tuple[str, str]] = {
    "pool_name": (
        "pool",
        "not a pool name: letters, digits and `_.:-`, starting with a letter or digit, "
        "at most 63 characters",
    ),
    "llm_name_check": ("name", "a model name has 1 to 200 characters"),
    "api_token_owner_id_check": ("owner", "an owner has 1 to 200 characters"),
    "task_priority_check": ("priority", "priority must be between -1000 and 1000"),
    "task_max_attempts_check": ("max_attempts", "max_attempts must be between 1 and 100"),
    "task_idempotency_key_check": ("Idempotency-Key", "Idempotency-Key has 1 to 255 characters"),
    "worker_session_capacity_check": ("capacity", "capacity must be between 1 and 10000"),
    "worker_session_pools_check": ("pools", "name at least one pool"),
    "llm_max_tokens_check": ("max_tokens", "max_tokens must be between 1 and 100000000"),
    "llm_max_n_check": ("max_n", "max_n must be between 1 and 1000"),
    "api_token_priority_range": ("priority_min", "priority_min must not exceed priority_max"),
}


# Raised by inferq.admit_discards() (sql/0009_discards.sql) on a submit over the token's limit
# of cancelled and failed tasks per hour; its DETAIL is "<discarded> <limit> <retry after s>".
DISCARDS_REFUSED = "IQ429"


def _discards_refused(exc: psycopg.Error) -> QuotaExceeded:
    try:
        used, cap, retry = (int(part) for part in (exc.diag.message_detail or "").split())
    except ValueError:
        log.error("database_error", sqlstate=exc.sqlstate, error=str(exc))
        used, cap, retry = 0, 0, 60
    return QuotaExceeded(
        f"this token had {used:,} tasks cancelled or failed in the last hour, its limit "
        f"(discarded_per_hour={cap}); they count so that submitting and cancelling cannot "
        f"grow the queue without bound. Retry in {retry} s, or ask an admin to raise the "
        "token's limit (inferq token update --discarded-per-hour)",
        retry_after_s=float(retry),
    )


def translate(exc: BaseException) -> BaseException:
    """The inferq error for a psycopg error (``exc`` itself when it is not one)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return DatabaseUnavailable("no database connection was free in time; retry")
    if not isinstance(exc, psycopg.Error):
        return exc
    if exc.sqlstate == DISCARDS_REFUSED:
        return _discards_refused(exc)
    if isinstance(exc, psycopg.errors.DataError | psycopg.errors.IntegrityError):
        diag = exc.diag
        key = diag.constraint_name or diag.datatype_name or ""
        field, message = _KNOWN.get(key, (diag.column_name or "", ""))
        log.info(
            "value_refused",
            sqlstate=exc.sqlstate,
            constraint=key or None,
            column=diag.column_name,
            detail=diag.message_primary,
        )
        if not message:
            message = "a value of the request is out of range or not allowed"
            if field:
                message = f"`{field}`: {message}"
        else:
            message = f"`{field}`: {message}"
        return InvalidValue(message, param=field or None)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseUnavailable(f"the database is unavailable ({type(exc).__name__}); retry")
    log.error("database_error", sqlstate=exc.sqlstate, error=str(exc))
    return DatabaseError()


class connect:
    """``pool.connection()`` whose errors are translated (see the module docstring)."""

    __slots__ = ("_cm",)

    def __init__(
        self, pool: psycopg_pool.AsyncConnectionPool[Any], timeout: float | None = None
    ) -> None:
        self._cm = pool.connection(timeout)

    async def __aenter__(self) -> AsyncConnection[Any]:
        try:
            conn: AsyncConnection[Any] = await self._cm.__aenter__()
            return conn
        except Exception as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # pool.connection() never swallows an exception: it returns the connection to the
        # pool and lets the exception go on, which is where it is translated.
        try:
            await self._cm.__aexit__(exc_type, exc, tb)
        except Exception as raised:
            translated = translate(raised)
            if translated is raised:
                raise
            raise translated from raised
        if exc is not None:
            translated = translate(exc)
            if translated is not exc:
                raise translated from exc
