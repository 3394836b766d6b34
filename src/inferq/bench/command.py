"""`inferq bench`: every scenario --runs times, a table of median/min/max, and --json figures.

Design decisions:

- The database is ``INFERQ_DATABASE_URL``'s server when set, else a private PostgreSQL started
  for the run with the settings a real deployment has (``fsync`` and ``synchronous_commit``
  on). Either way the scenarios run in a scratch database created for the run and dropped
  after it, so a benchmark never leaves 100,000 tasks in someone's queue; when the role may
  not create databases the configured database itself is used (migrated first).
- Each scenario returns plain figures for one run; this module repeats them, keeps every run's
  value in the JSON, and reports the median with min and max. Progress goes to stderr while
  it runs, the table to stdout at the end.
- A scenario that fails is reported as failed (its figures absent, the error in the JSON) and
  the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from inferq import runtime
from inferq.bench import batch, ceiling, fairness, fanout, http, latency, memory, pipeline
from inferq.bench.report import FIGURES, build_report, render_table
from inferq.bench.stats import percentile
from inferq.db.cluster import PrivateCluster
from inferq.db.migrations import Migrator
from inferq.settings import Settings


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each scenario does in one run."""

    ceiling_s: float
    pipeline_tasks: int
    claim_tasks: int
    wake_tasks: int
    relay_streams: int
    relay_chunks: int
    waiter_memory: int
    http_requests: int
    http_clients: int
    open_waits: int
    batch_lines: int
    # The replicas scenario, at each replica count: tasks woken, streams x chunks relayed;
    # and notifications sent to a replica with no waiter.
    fan_out: tuple[int, int, int, int] = (1000, 100, 200, 5000)
    # The fairness scenario: owners x tasks each pending, then this many claims.
    fairness: tuple[int, int, int] = (100, 100, 2000)

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                1,
                300,
                50,
                50,
                20,
                20,
                500,
                100,
                8,
                200,
                500,
                fan_out=(40, 8, 16, 500),
                fairness=(8, 40, 100),
            )
        return cls(3, 20_000, 2000, 2000, 200, 500, 10_000, 2000, 16, 10_000, 50_000)


Progress = Callable[[str], None]

# Chunks/s of one paced relay stream: an LLM streams 30-100 tokens/s, and 200 streams at this
# rate offer 20,000 chunks/s, the relay's throughput target.
RELAY_STREAM_RATE = 100.0

# The first word of each scenario's name, as --only takes it.
SCENARIOS = frozenset(
    {
        "ceiling",
        "pipeline",
        "claim",
        "wake",
        "relay",
        "waiters",
        "http",
        "memory",
        "batch",
        "replicas",
        "fairness",
    }
)


def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run every scenario ``args.runs`` times (1 with --quick), print the table, write --json.

    Returns 0 when every scenario ran (targets missed or not), 1 when one failed.
    """
    # SIGTERM unwinds like Ctrl-C, so the private cluster, the scratch database and the
    # replica processes are cleaned up by the finally blocks instead of being left running.
    signal.signal(signal.SIGTERM, _terminate)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness probe otherwise
    runs = 1 if args.quick else max(1, args.runs)
    sizes = Sizes.for_mode(args.quick)
    only = frozenset(getattr(args, "only", None) or ())
    unknown = only - SCENARIOS
    if unknown:
        print(
            f"inferq bench: unknown scenario {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(sorted(SCENARIOS))}",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    with _database(settings, progress) as (dsn, cluster_note):
        machine = _machine(dsn, cluster_note)
        progress(
            f"{machine['cores']} cores, PostgreSQL {machine['postgresql']}, "
            f"synchronous_commit={machine['synchronous_commit']}, fsync={machine['fsync']}"
        )
        values, errors = _run_all(dsn, sizes, runs, progress, only)

    report = build_report(machine, values, errors, runs, args.quick, time.monotonic() - started)
    print(render_table(report))
    if args.json_path:
        Path(args.json_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        progress(f"figures written to {args.json_path}")
    return 1 if errors else 0


def _run_all(
    dsn: str, sizes: Sizes, runs: int, progress: Progress, only: frozenset[str] = frozenset()
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Every scenario ``runs`` times: each figure's value per run, and the failed scenarios."""
    values: dict[str, list[float]] = {f.key: [] for f in FIGURES}
    errors: dict[str, str] = {}
    for run in range(1, runs + 1):
        progress(f"run {run} of {runs}")
        for name, scenario in _scenarios(dsn, sizes, progress):
            if only and name.split()[0] not in only:
                continue
            progress(f"  {name} ...")
            t0 = time.monotonic()
            try:
                figures = scenario()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                progress(f"  {name} FAILED: {errors[name]}")
                traceback.print_exc(file=sys.stderr)
                continue
            for key, value in figures.items():
                values[key].append(value)
            shown = ", ".join(f"{k.split('.', 1)[1]}={v:,.2f}" for k, v in figures.items())
            progress(f"  {name} done in {time.monotonic() - t0:.1f}s: {shown}")
        # The fraction compares the best pipeline rate with the ceiling of the same run.
        best = max((values[k][-1] for k in _PIPELINE_KEYS if len(values[k]) == run), default=None)
        notify = values["ceiling.insert_notify_commits_per_s"]
        if best is not None and len(notify) == run:
            values["pipeline.fraction_of_notify_ceiling"].append(best / notify[-1])
    return values, errors


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


_PIPELINE_KEYS = ("pipeline.p1_tasks_per_s", "pipeline.p4_tasks_per_s", "pipeline.p16_tasks_per_s")


def _scenarios(
    dsn: str, sizes: Sizes, progress: Progress
) -> Iterator[tuple[str, Callable[[], dict[str, float]]]]:
    """(name, one run) in the order they run; each returns {figure key: value}."""
    yield "ceiling", lambda: _ceiling(dsn, sizes)
    yield "pipeline", lambda: runtime.run(_pipeline(dsn, sizes, progress))
    yield "claim latency", lambda: runtime.run(_claim(dsn, sizes))
    yield "wake latency", lambda: runtime.run(_wake(dsn, sizes))
    yield "relay", lambda: runtime.run(_relay(dsn, sizes))
    yield "waiters memory", lambda: runtime.run(_waiter_memory(dsn, sizes))
    yield (
        "http",
        lambda: http.measure_http(
            dsn, requests=sizes.http_requests, clients=sizes.http_clients, progress=progress
        ),
    )
    yield (
        "memory (open waits)",
        lambda: memory.measure_wait_memory(dsn, open_waits=sizes.open_waits, progress=progress),
    )
    yield "batch", lambda: batch.measure_batch(dsn, lines=sizes.batch_lines, progress=progress)
    owners, per_owner, claims = sizes.fairness
    yield (
        "fairness",
        lambda: runtime.run(
            fairness.measure_fairness(dsn, owners=owners, tasks_per_owner=per_owner, claims=claims)
        ),
    )
    tasks, streams, chunks, notifications = sizes.fan_out
    yield (
        "replicas (fan-out)",
        lambda: runtime.run(
            fanout.measure_fan_out(
                dsn,
                tasks=tasks,
                streams=streams,
                chunks_per_stream=chunks,
                notifications=notifications,
                progress=progress,
            )
        ),
    )


def _ceiling(dsn: str, sizes: Sizes) -> dict[str, float]:
    figures, _client = ceiling.measure_ceiling(dsn, duration_s=sizes.ceiling_s)
    n = 50 if sizes.ceiling_s < 2 else 300
    commits = ceiling.measure_commit_latency(dsn, commits=n)
    notifying = ceiling.measure_commit_latency(dsn, commits=n, notify=True)
    return {
        "ceiling.notify_commit_p50_ms": statistics.median(notifying) * 1000,
        "ceiling.insert_commits_per_s": figures["insert_commits_per_s"],
        "ceiling.insert_notify_commits_per_s": figures["insert_notify_commits_per_s"],
        "ceiling.commit_p50_ms": statistics.median(commits) * 1000,
    }


async def _pipeline(dsn: str, sizes: Sizes, progress: Progress) -> dict[str, float]:
    out = {}
    cpu = []
    for producers, key in zip((1, 4, 16), _PIPELINE_KEYS, strict=True):
        result = await pipeline.measure_pipeline(
            dsn, producers=producers, tasks=sizes.pipeline_tasks
        )
        progress(
            f"    {producers} producer(s): {result.tasks_per_s:,.0f} tasks/s, "
            f"{result.cpu_s_per_task * 1e6:,.0f} us Python CPU per task"
        )
        out[key] = result.tasks_per_s
        cpu.append(result.cpu_s_per_task)
    out["pipeline.python_cpu_us_per_task"] = statistics.median(cpu) * 1e6
    return out


async def _claim(dsn: str, sizes: Sizes) -> dict[str, float]:
    samples = await latency.measure_claim_latency(dsn, tasks=sizes.claim_tasks)
    claims = sorted(s.claimed for s in samples)
    enqueues = [s.enqueued for s in samples]
    return {
        "claim.p50_ms": statistics.median(claims) * 1000,
        "claim.p99_ms": percentile(claims, 0.99) * 1000,
        "claim.max_ms": claims[-1] * 1000,
        "claim.enqueue_p50_ms": statistics.median(enqueues) * 1000,
    }


async def _wake(dsn: str, sizes: Sizes) -> dict[str, float]:
    from inferq.bench import wakeups

    result: Any = await wakeups.measure_wake_latency(dsn, tasks=sizes.wake_tasks)
    # (from the complete call, from its commit acknowledgement); older versions: the first only.
    full, after_commit = result if isinstance(result, tuple) else (result, None)
    figures = {"wake.p50_ms": full.p50_ms, "wake.p99_ms": full.p99_ms}
    if after_commit is not None:
        figures["wake.after_commit_p50_ms"] = after_commit.p50_ms
        figures["wake.after_commit_p99_ms"] = after_commit.p99_ms
    return figures


async def _relay(dsn: str, sizes: Sizes) -> dict[str, float]:
    """The relay twice: saturated (every worker posts again as soon as its post returns: the
    throughput ceiling, whose latency is mostly queueing for the CPU), then paced at the
    target load (each stream at RELAY_STREAM_RATE chunks/s, open loop): the latency target
    is read on the paced run, the load a real deployment of that size offers."""
    from inferq.bench import wakeups

    saturated = await wakeups.measure_relay(
        dsn, streams=sizes.relay_streams, chunks_per_stream=sizes.relay_chunks
    )
    paced = await wakeups.measure_relay(
        dsn,
        streams=sizes.relay_streams,
        chunks_per_stream=sizes.relay_chunks,
        rate_per_stream=RELAY_STREAM_RATE,
    )
    return {
        "relay.chunks_per_s": saturated.chunks_per_s,
        "relay.p50_ms": saturated.latency.p50_ms,
        "relay.p99_ms": saturated.latency.p99_ms,
        "relay.cpu_us_per_chunk": saturated.cpu_s_per_chunk * 1e6,
        "relay.paced_chunks_per_s": paced.chunks_per_s,
        "relay.paced_p50_ms": paced.latency.p50_ms,
        "relay.paced_p99_ms": paced.latency.p99_ms,
    }


async def _waiter_memory(dsn: str, sizes: Sizes) -> dict[str, float]:
    from inferq.bench import wakeups

    result = await wakeups.measure_waiter_memory(dsn, waiters=sizes.waiter_memory)
    return {"waiters.bytes_per_waiter": result.per_waiter_bytes}


# -- database -------------------------------------------------------------------------------


@contextmanager
def _database(settings: Settings, progress: Progress) -> Iterator[tuple[str, str]]:
    """A migrated scratch database DSN for the run, and where it lives."""
    cluster: PrivateCluster | None = None
    server_dsn = settings.database_url
    note = "INFERQ_DATABASE_URL"
    if not server_dsn:
        progress("starting a private PostgreSQL (fsync on, synchronous_commit on)")
        cluster = PrivateCluster(
            Path(tempfile.mkdtemp(prefix="inferq-bench-pg-")),
            settings={"fsync": "on", "synchronous_commit": "on", "shared_buffers": "256MB"},
        )
        cluster.start()
        server_dsn = cluster.dsn
        note = "private cluster started for the run"
    try:
        with _scratch_database(server_dsn, progress) as dsn:
            progress("migrating the scratch database")
            Migrator(dsn).migrate()
            yield dsn, note
    finally:
        if cluster is not None:
            cluster.destroy()


@contextmanager
def _scratch_database(server_dsn: str, progress: Progress) -> Iterator[str]:
    name = f"inferq_bench_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    try:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    except psycopg.errors.InsufficientPrivilege:
        progress("no CREATEDB privilege: benchmarking in the configured database itself")
        yield server_dsn
        return
    try:
        yield psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def _machine(dsn: str, cluster_note: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'), "
            "current_setting('fsync'), current_setting('wal_sync_method')"
        ).fetchone()
    assert row is not None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cores": os.cpu_count(),
        "postgresql": row[0],
        "synchronous_commit": row[1],
        "fsync": row[2],
        "wal_sync_method": row[3],
        "database": cluster_note,
        "ceiling_client": "pgbench" if ceiling.pgbench_path() else "psycopg threads",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m_at_start": load,
    }
