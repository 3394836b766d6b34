"""`inferq token create|update` quota options, `inferq token update`, and `inferq usage`.

Like `inferq token`, they work straight against the database (inferq.admin.with_pool). A quota
option takes a number (0 refuses everything) or ``none`` (no limit); `token update` changes
only the options it is given. `inferq usage` prints the totals per hour, owner, token and
model of every owner (``--owner`` for one), the last 24 hours unless ``--from``/``--to``.

This module imports no server package at import time: `inferq --help` parses without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from inferq.errors import ConfigurationError
from inferq.settings import Settings

if TYPE_CHECKING:
    from inferq.db.pool import Pool
    from inferq.domain.quotas import Quota

# Option -> Quota field.
OPTIONS = {
    "--max-pending": "max_pending",
    "--max-running": "max_running",
    "--rpm": "requests_per_minute",
    "--tpm": "tokens_per_minute",
    "--tpd": "tokens_per_day",
    "--discarded-per-hour": "discarded_per_hour",
}
_HELP = {
    "max_pending": "pending tasks at most",
    "max_running": "claimed or running tasks at most (enforced at claim time)",
    "requests_per_minute": "requests admitted per minute",
    "tokens_per_minute": "tokens (prompt + completion, of completed tasks) per minute",
    "tokens_per_day": "tokens per UTC day",
    "discarded_per_hour": "tasks cancelled or failed per rolling hour (`none`: the server's "
    "INFERQ_MAX_DISCARDED_PER_HOUR)",
}


def _limit(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or `none`") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a limit is 0 or more (`none` for no limit)")
    return value


def add_quota_arguments(parser: argparse.ArgumentParser) -> None:
    """The quota options of `token create` and `token update`."""
    for option, field in OPTIONS.items():
        parser.add_argument(
            option,
            dest=field,
            type=_limit,
            default=argparse.SUPPRESS,  # absent unless given: `update` changes only those
            metavar="N|none",
            help=_HELP[field],
        )


def given(args: argparse.Namespace) -> dict[str, int | None]:
    """The quota options given on the command line."""
    return {field: getattr(args, field) for field in OPTIONS.values() if hasattr(args, field)}


def describe(quota: Quota) -> str:
    limits = [f"{k}={v}" for k, v in quota.as_json().items() if v is not None]
    return " ".join(limits) or "no quota"


async def set_quota(pool: Pool, token_id: UUID, changes: dict[str, Any]) -> Quota:
    """The token's quota with ``changes`` applied; raises TokenNotFound."""
    from inferq.db.quotas import QuotaRepository
    from inferq.services.quotas import QuotaService

    service = QuotaService(QuotaRepository(pool))
    current = await service.get(token_id)
    return await service.put(token_id, replace(current, **changes))


async def update_command(pool: Pool, args: argparse.Namespace) -> int:
    """`inferq token update TOKEN_ID [quota options]`."""
    try:
        token_id = UUID(args.token_id)
    except ValueError:
        raise ConfigurationError(f"{args.token_id!r} is not a token id") from None
    quota = await set_quota(pool, token_id, given(args))
    print(f"token {token_id}: {describe(quota)}")
    return 0


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def add_usage_parser(sub: Any) -> None:
    p = sub.add_parser("usage", help="tokens used per hour, owner, token and model")
    p.add_argument("--owner", help="one owner (default: every owner)")
    p.add_argument("--from", dest="start", type=_moment, help="first hour (default: 24 h ago)")
    p.add_argument("--to", dest="end", type=_moment, help="end, exclusive (default: now)")
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--json", action="store_true", help="print JSON")


def usage_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq usage`."""
    from inferq.admin import with_pool
    from inferq.db.usage import UsageRepository

    end = args.end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(
        hours=1
    )
    start = args.start or end - timedelta(hours=24)

    async def work(pool: Pool) -> int:
        rows = await UsageRepository(pool).totals(args.owner, start, end, args.limit)
        if args.json:
            data = [row.as_json() for row in rows]
            print(json.dumps({"object": "list", "data": data}, default=str, indent=2))
            return 0
        print(f"{'hour (UTC)':17} {'owner':16} {'model':20} {'requests':>9} {'prompt':>10} "
              f"{'completion':>10} {'total':>10}  token")  # fmt: skip
        totals = [0, 0, 0]
        for r in rows:
            hour = r.hour.astimezone(UTC).strftime("%Y-%m-%d %H:00")
            total = r.prompt_tokens + r.completion_tokens
            print(f"{hour:17} {r.owner_id:16} {r.model or '-':20} {r.requests:>9} "
                  f"{r.prompt_tokens:>10} {r.completion_tokens:>10} {total:>10}  "
                  f"{r.token_id or '-'}")  # fmt: skip
            totals = [totals[0] + r.requests, totals[1] + r.prompt_tokens, totals[2] + total]
        print(f"{'total':55} {totals[0]:>9} {totals[1]:>10} {totals[2] - totals[1]:>10} "
              f"{totals[2]:>10}")  # fmt: skip
        if len(rows) == args.limit:
            print(f"(the first {args.limit} rows only: narrow --from/--to)", file=sys.stderr)
        return 0

    return with_pool(settings, work)
