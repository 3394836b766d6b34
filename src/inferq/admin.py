"""`inferq token | llm | status | tasks`: administration straight against the database (token
quotas and `inferq usage`: inferq.quotacli).

They use INFERQ_DATABASE_URL, or the embedded database of INFERQ_DATA_DIR (started for the
command when `inferq serve` is not running, and stopped again afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast
from uuid import UUID

from inferq import quotacli
from inferq.db.llms import LlmRepository
from inferq.db.pool import Pool, create_pool
from inferq.db.stats import StatsRepository
from inferq.db.tokens import TokenRepository
from inferq.domain.lanes import LANES, LanePolicy
from inferq.domain.records import ApiToken, Llm, Role
from inferq.domain.task import TaskStatus
from inferq.errors import ConfigurationError, InvalidValue
from inferq.settings import Settings

T = TypeVar("T")


def with_pool(
    settings: Settings, work: Callable[[Pool], Awaitable[T]], dsn: str | None = None
) -> T:
    """Run ``work`` with a small pool on the configured (or embedded) database."""
    started_here = False
    if dsn is None:
        dsn = settings.database_url
    if not dsn:
        from inferq.embedded import embedded_dsn

        dsn, started_here = embedded_dsn(settings, announce=False), True
    small = settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 2})

    async def run() -> T:
        pool = create_pool(small, dsn)
        await pool.open(wait=True, timeout=15.0)
        try:
            return await work(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(run())
    finally:
        if started_here:
            from inferq.embedded import stop_embedded

            stop_embedded(only_if_started_here=True)


def token_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq token create|list|revoke|update`."""

    async def work(pool: Pool) -> int:
        tokens = TokenRepository(pool)
        if args.token_command == "create":
            defaults = LanePolicy()
            policy = LanePolicy(
                args.lanes or defaults.lanes,
                defaults.priority_min if args.priority_min is None else args.priority_min,
                defaults.priority_max if args.priority_max is None else args.priority_max,
                defaults.weight if args.weight is None else args.weight,
            )
            try:
                token, secret = await tokens.create(
                    args.owner,
                    cast(Role, args.role),
                    pools=args.pools,
                    label=args.label,
                    policy=policy,
                )
            except ValueError as exc:
                raise ConfigurationError(f"--pools: {exc}") from None
            except InvalidValue as exc:
                raise ConfigurationError(str(exc)) from None
            print(secret)
            print(
                f"token {token.id} owner={token.owner_id} role={token.role} "
                f"pools={','.join(token.pools) if token.pools else '*'} {_policy(token)} "
                "(the secret above is shown once)",
                file=sys.stderr,
            )
            if quotacli.given(args):
                quota = await quotacli.set_quota(pool, token.id, quotacli.given(args))
                print(f"token {token.id}: {quotacli.describe(quota)}", file=sys.stderr)
            return 0
        if args.token_command == "list":
            for t in await tokens.all():
                state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
                pools = ",".join(t.pools) if t.pools else "*"
                print(
                    f"{t.id}  {t.owner_id:20} {t.role:7} pools={pools:20} {_policy(t)} "
                    f"{state}  {t.label or ''}"
                )
            return 0
        try:
            token_id = UUID(args.token_id)
        except ValueError:
            raise ConfigurationError(f"{args.token_id!r} is not a token id") from None
        if args.token_command == "update":
            lane_options = (args.lanes, args.priority_min, args.priority_max, args.weight)
            if all(option is None for option in lane_options):
                if not quotacli.given(args):
                    raise ConfigurationError(
                        "token update: give a lane option (--lanes, --priority-min, "
                        "--priority-max, --weight) or a quota option (see --help)"
                    )
                return await quotacli.update_command(pool, args)
            try:
                updated = await tokens.update_policy(
                    token_id,
                    lanes=args.lanes,
                    priority_min=args.priority_min,
                    priority_max=args.priority_max,
                    weight=args.weight,
                )
            except InvalidValue as exc:
                raise ConfigurationError(str(exc)) from None
            if updated is None:
                print(f"inferq: token {token_id} does not exist or is revoked", file=sys.stderr)
                return 1
            print(f"updated {token_id}: {_policy(updated)}")
            if quotacli.given(args):
                return await quotacli.update_command(pool, args)
            return 0
        if not await tokens.revoke(token_id):
            print(f"inferq: token {token_id} does not exist or is already revoked", file=sys.stderr)
            return 1
        print(f"revoked {token_id}")
        return 0

    return with_pool(settings, work)


def _policy(token: ApiToken) -> str:
    return (
        f"lanes={','.join(token.lanes)} priority={token.priority_min}..{token.priority_max} "
        f"weight={token.weight}"
    )


def tasks_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq tasks`: tasks of every owner, newest first, filtered by owner, pool, lane and
    status (what GET /v1/admin/tasks answers)."""
    try:
        statuses = [TaskStatus(s) for s in args.status or ()]
    except ValueError as exc:
        raise ConfigurationError(f"--status: {exc}") from None

    async def work(pool: Pool) -> int:
        page = await StatsRepository(pool).list_tasks(
            owner_id=args.owner,
            pool_name=args.pool,
            lane=args.lane,
            statuses=statuses or None,
            limit=args.limit,
        )
        for t in page.tasks:
            if args.json:
                print(
                    json.dumps(
                        {
                            "id": str(t.id),
                            "owner": t.owner_id,
                            "pool": t.pool_name,
                            "lane": t.lane,
                            "status": t.status.value,
                            "priority": t.priority,
                            "created_at": t.created_at.isoformat(),
                        }
                    )
                )
            else:
                print(
                    f"{t.id}  {t.owner_id:20} pool={t.pool_name:16} lane={t.lane:11} "
                    f"{t.status.value:9} priority={t.priority} {t.created_at:%Y-%m-%d %H:%M:%S}"
                )
        return 0

    return with_pool(settings, work)


def llm_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq llm add|list|remove`."""

    async def work(pool: Pool) -> int:
        llms = LlmRepository(pool)
        if args.llm_command == "add":
            llm = await llms.put(
                args.name,
                args.pool,
                args.model,
                args.tier,
                max_tokens=args.max_tokens,
                max_n=args.max_n,
            )
            where = f"pool {llm.pool_name} (model {llm.model}, tier {llm.tier}{_caps(llm)})"
            print(f"{llm.name} -> {where}")
            return 0
        if args.llm_command == "list":
            for llm in await llms.all():
                print(
                    f"{llm.name:30} pool={llm.pool_name:20} model={llm.model} tier={llm.tier}"
                    f"{_caps(llm)}"
                )
            return 0
        if not await llms.remove(args.name):
            print(f"inferq: model {args.name!r} does not exist", file=sys.stderr)
            return 1
        print(f"removed {args.name}")
        return 0

    return with_pool(settings, work)


def _caps(llm: Llm) -> str:
    caps = [
        f"{name}={value}"
        for name, value in (("max_tokens", llm.max_tokens), ("max_n", llm.max_n))
        if value
    ]
    return "".join(f" {cap}" for cap in caps)


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq status`: running replicas (their LISTEN connections), live worker sessions,
    tasks per pool and status. A session is live only while a replica runs: without one no
    worker can heartbeat, whatever time its session row has left."""

    async def work(pool: Pool) -> int:
        repo = StatsRepository(pool)
        stats, listeners = await repo.queue(), await repo.listeners()
        sessions = stats.sessions if listeners else 0
        capacity = stats.capacity if listeners else 0
        if args.json:
            document = stats.as_json()
            document["sessions"] = {"live": sessions, "capacity": capacity}
            document["replicas_listening"] = listeners
            print(json.dumps(document, indent=2))
            return 0
        print(f"replicas listening: {listeners}")
        if not listeners:
            print("no replica is running: no worker session can be live (start `inferq serve`)")
        print(f"worker sessions: {sessions} live, capacity {capacity}")
        if not stats.tasks:
            print("no tasks")
        for pool_name, counts in sorted(stats.tasks.items()):
            line = "  ".join(f"{status}={n}" for status, n in sorted(counts.items()))
            print(f"pool {pool_name:20} {line}")
            lanes = stats.lanes.get(pool_name, {})
            for lane in LANES:
                if lane in lanes:
                    n, age = lanes[lane]
                    print(f"  lane {lane:12} pending={n}  oldest={age:.1f}s")
        return 0

    return with_pool(settings, work)
