"""PostgreSQL's own commit rate here: single-row inserts, and inserts that also pg_notify.

Design decisions:

- The scratch table is a plain (logged) table created and dropped per measurement, so each
  commit pays the WAL flush that inferq's own commits pay under ``synchronous_commit = on``.
- The load is driven by ``pgbench`` (a C client) when the server binaries are installed: the
  ceiling must be the database's, not a Python client's. Without pgbench, threads running
  synchronous psycopg statements drive it (libpq releases the GIL while waiting), which reads
  lower on a small machine; the figures say which client measured them.
- Both rates use the same concurrency (``CONNECTIONS``); a notifying commit takes a
  cluster-wide lock, so the second rate barely moves with concurrency.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from inferq.db.cluster import find_bindir

CONNECTIONS = 8
CHANNEL = "inferq_bench"

_INSERT = "INSERT INTO {table} (payload) VALUES ('x')"
_INSERT_NOTIFY = (
    "WITH i AS (INSERT INTO {table} (payload) VALUES ('x') RETURNING id) "
    "SELECT pg_notify({channel}, i.id::text) FROM i"
)


def measure_ceiling(dsn: str, *, duration_s: float) -> tuple[dict[str, float], str]:
    """Commits/s of single-row inserts and of insert+pg_notify, ``CONNECTIONS`` clients each.

    Creates and drops a scratch table in ``dsn``'s database. Returns the figures and the name
    of the client that drove the load ("pgbench" or "psycopg threads").
    """
    table = f"inferq_bench_ceiling_{uuid.uuid4().hex[:12]}"
    ident = sql.Identifier(table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, payload text)").format(ident)
        )
    try:
        pgbench = pgbench_path()
        client = "pgbench" if pgbench else "psycopg threads"
        figures = {}
        for name, template in (
            ("insert_commits_per_s", _INSERT),
            ("insert_notify_commits_per_s", _INSERT_NOTIFY),
        ):
            # The table name is a generated identifier, quoted by psycopg.sql.
            statement = (
                sql.SQL(template).format(table=ident, channel=sql.Literal(CHANNEL)).as_string()
            )
            if pgbench:
                rate = _pgbench_rate(pgbench, dsn, statement, duration_s)
            else:
                rate = _threads_rate(dsn, statement, duration_s)
            figures[name] = rate
        return figures, client
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


def pgbench_path() -> Path | None:
    """The pgbench next to the server binaries, or None."""
    bindir = find_bindir()
    if bindir is None or not (bindir / "pgbench").exists():
        return None
    return bindir / "pgbench"


def _pgbench_rate(pgbench: Path, dsn: str, statement: str, duration_s: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(statement + ";\n")
        script.flush()
        out = subprocess.run(
            [
                str(pgbench),
                "--no-vacuum",
                "--client",
                str(CONNECTIONS),
                "--jobs",
                "2",
                "--time",
                str(max(1, round(duration_s))),
                "--protocol",
                "prepared",
                "--file",
                script.name,
                dsn,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration_s + 60,
        )
    match = re.search(r"tps = ([0-9.]+)", out.stdout)
    if match is None:
        raise RuntimeError(f"unexpected pgbench output: {out.stdout[-500:]}")
    return float(match.group(1))


def _threads_rate(dsn: str, statement: str, duration_s: float) -> float:
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(CONNECTIONS)]
    counts = [0] * CONNECTIONS
    stop_at = time.perf_counter() + duration_s

    def drive(i: int) -> None:
        conn = conns[i]
        while time.perf_counter() < stop_at:
            conn.execute(statement.encode(), prepare=True)
            counts[i] += 1

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(CONNECTIONS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    return sum(counts) / elapsed


def measure_commit_latency(dsn: str, *, commits: int, notify: bool = False) -> list[float]:
    """Seconds per single-row insert commit on one idle connection: the WAL flush floor of
    every latency figure under ``synchronous_commit = on``. With ``notify`` each insert also
    sends a pg_notify that a second connection LISTENs to, as every inferq transition does.
    Uses its own scratch table."""
    table = sql.Identifier(f"inferq_bench_commit_{uuid.uuid4().hex[:12]}")
    template = _INSERT_NOTIFY if notify else _INSERT
    statement = sql.SQL(template).format(table=table, channel=sql.Literal(CHANNEL))
    samples = []
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        psycopg.connect(dsn, autocommit=True) as listener,
    ):
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        conn.execute(
            sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, payload text)").format(table)
        )
        try:
            for _ in range(commits):
                started = time.perf_counter()
                conn.execute(statement, prepare=True)
                samples.append(time.perf_counter() - started)
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    return samples
