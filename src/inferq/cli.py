"""The `inferq` command: serve | migrate | sql-dir | worker | token | llm | status | tasks |
batch | bench | usage."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

from inferq import batchcli, quotacli
from inferq.errors import InferqError
from inferq.logs import configure_logging
from inferq.settings import Settings

# What `pip install 'inferq[server]'` adds to the worker's base install.
SERVER_MODULES = ("fastapi", "uvicorn", "psycopg", "psycopg_pool", "prometheus_client")

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from inferq.db.migrations import Migrator

    dsn = args.database_url or settings.database_url
    if not dsn:
        from inferq.embedded import embedded_dsn

        dsn = embedded_dsn(settings)
    migrator = Migrator(dsn)
    if args.status:
        for state in migrator.status():
            mark = "applied" if state.applied else "pending"
            if state.applied and not state.checksum_ok:
                mark = "EDITED"
            print(f"{state.migration.name:32} {mark}")
        return 0
    applied = migrator.migrate()
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(m.name for m in applied)}")
    else:
        print("database is up to date")
    return 0


def cmd_sql_dir(args: argparse.Namespace, settings: Settings) -> int:
    from inferq.db.migrations import sql_dir

    print(sql_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the sql/ migrations (under an advisory lock)")
    p.add_argument("--database-url", help="default: INFERQ_DATABASE_URL")
    p.add_argument("--status", action="store_true", help="list applied and pending files")
    p.set_defaults(func=_server(cmd_migrate))

    p = sub.add_parser("sql-dir", help="print where the migration files are (for psql)")
    p.set_defaults(func=_server(cmd_sql_dir))

    p = sub.add_parser("serve", help="run one replica: HTTP API, listener, maintenance")
    p.add_argument("--host", help="default: INFERQ_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: INFERQ_PORT (8000)")
    p.set_defaults(func=_server(_lazy("inferq.daemon:serve_command")))

    p = sub.add_parser(
        "worker",
        help="run a worker in front of an inference backend",
        description="Secrets come from the environment or from files, never from argv: "
        "the worker token from INFERQ_WORKER_TOKEN or --token-file, the upstream's API key "
        "from INFERQ_BACKEND_API_KEY or --backend-api-key-file.",
    )
    p.add_argument("--url", required=True, help="inferq base URL, e.g. https://inferq.example")
    p.add_argument("--token-file", help="file holding the worker token (else INFERQ_WORKER_TOKEN)")
    p.add_argument("--pool", action="append", required=True, help="pool to serve (repeatable)")
    p.add_argument("--capacity", type=int, default=1, help="tasks in flight at most")
    p.add_argument(
        "--backend", default="echo", help="'echo', or the URL of an OpenAI-compatible server"
    )
    p.add_argument(
        "--backend-api-key-file",
        help="file holding the upstream server's API key (else INFERQ_BACKEND_API_KEY)",
    )
    p.add_argument("--backend-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--echo-delay", type=float, default=0.0, help="echo: seconds per word")
    p.add_argument("--name", help="worker name shown in logs and sessions")
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow http:// to a host other than this one (the token travels in clear)",
    )
    for flag, instead in (
        ("--token", "INFERQ_WORKER_TOKEN or --token-file"),
        ("--backend-api-key", "INFERQ_BACKEND_API_KEY or --backend-api-key-file"),
    ):
        p.add_argument(flag, nargs="?", action=_Refused, instead=instead, help=argparse.SUPPRESS)
    p.set_defaults(func=_lazy("inferq.worker.cli:worker_command"))

    p = sub.add_parser("token", help="create, list and revoke API tokens")
    tsub = p.add_subparsers(dest="token_command", required=True)
    t = tsub.add_parser("create", help="create a token and print its secret once")
    t.add_argument("--owner", required=True)
    t.add_argument("--role", choices=["client", "worker", "admin"], default="client")
    t.add_argument("--pools", nargs="*", help="worker tokens: pools it may serve (default all)")
    t.add_argument("--label")
    _lane_policy_args(t)
    quotacli.add_quota_arguments(t)
    tsub.add_parser("list", help="list tokens (never their secrets)")
    t = tsub.add_parser("revoke", help="revoke a token by id")
    t.add_argument("token_id")
    t = tsub.add_parser(
        "update", help="change a token's lanes, priority range, weight or quotas (those given)"
    )
    t.add_argument("token_id")
    _lane_policy_args(t)
    quotacli.add_quota_arguments(t)
    p.set_defaults(func=_server(_lazy("inferq.admin:token_command")))
    quotacli.add_usage_parser(sub)
    sub.choices["usage"].set_defaults(func=_server(_lazy("inferq.quotacli:usage_command")))

    p = sub.add_parser("tasks", help="list tasks of every owner, newest first (admins)")
    p.add_argument("--owner")
    p.add_argument("--pool")
    p.add_argument("--lane", choices=["interactive", "default", "batch"])
    p.add_argument("--status", nargs="*", help="pending, claimed, running, completed, ...")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_server(_lazy("inferq.admin:tasks_command")))

    p = sub.add_parser("llm", help="manage the LLM registry (model name -> pool)")
    lsub = p.add_subparsers(dest="llm_command", required=True)
    t = lsub.add_parser("add", help="add or replace a model")
    t.add_argument("name")
    t.add_argument("--pool", required=True)
    t.add_argument("--model", help="upstream model name (default: the name)")
    t.add_argument("--tier", default="standard")
    t.add_argument(
        "--max-tokens", type=int, help="cap on a request's max_tokens (default INFERQ_MAX_TOKENS)"
    )
    t.add_argument("--max-n", type=int, help="cap on a request's n (default INFERQ_MAX_N)")
    lsub.add_parser("list", help="list models")
    t = lsub.add_parser("remove", help="remove a model")
    t.add_argument("name")
    p.set_defaults(func=_server(_lazy("inferq.admin:llm_command")))

    p = sub.add_parser(
        "status",
        help="running replicas, live worker sessions, tasks per pool and status, depth and "
        "oldest wait per pool and lane",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_server(_lazy("inferq.admin:status_command")))

    batchcli.add_parser(sub)
    sub.choices["batch"].set_defaults(func=_lazy("inferq.batchcli:batch_command"))

    p = sub.add_parser("bench", help="measure throughput and latency on this machine")
    p.add_argument("--quick", action="store_true", help="a short run for smoke tests")
    p.add_argument("--json", dest="json_path", help="write the figures to this file")
    p.add_argument("--runs", type=int, default=3, help="repetitions per figure (median)")
    p.add_argument(
        "--only",
        metavar="SCENARIO",
        action="append",
        help="run only this scenario (repeatable): ceiling, pipeline, claim, wake, relay, "
        "waiters, http, memory, batch, replicas, fairness",
    )
    p.set_defaults(func=_server(_lazy("inferq.bench.command:bench_command")))
    return parser


def _lane_policy_args(p: argparse.ArgumentParser) -> None:
    """Scheduling options of `token create` and `token update` (README, "Lanes and fair
    share"); omitted on create: every lane and priority, weight 1."""
    p.add_argument(
        "--lanes", nargs="+", choices=["interactive", "default", "batch"], help="lanes it may use"
    )
    p.add_argument("--priority-min", type=int, help="lowest priority it may ask for")
    p.add_argument("--priority-max", type=int, help="highest priority it may ask for")
    p.add_argument("--weight", type=int, help="its owner's share of a lane (default 1)")


def _lazy(target: str) -> Command:
    """Import a command's module only when it runs (the worker needs no server packages)."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args, settings))

    return run


def _server(command: Command) -> Command:
    """``command`` when the server's packages are installed; else a clear error (a worker
    install, ``pip install inferq``, has none of them)."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            print(
                f"inferq {args.command}: this install is the worker only (missing: "
                f"{', '.join(missing)}); install the server with: pip install 'inferq[server]'",
                file=sys.stderr,
            )
            return 2
        return command(args, settings)

    return run


class _Refused(argparse.Action):
    """An option that used to take a secret on the command line (where `ps` shows it)."""

    def __init__(self, *args: Any, instead: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        option = args[-1] if args else self.option_strings[0]
        parser.error(
            f"{option} is not accepted: a secret on the command line shows in ps and in shell "
            f"history; use {self.instead}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, settings))
    except InferqError as exc:
        print(f"inferq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
