"""Deployment: a throwaway PostgreSQL, N `inferq serve` replicas, nginx and echo workers.

Everything is a real process started from this checkout, so faults are real: a replica is
killed with SIGKILL, PostgreSQL is restarted with `pg_ctl restart -m fast`, a LISTEN connection
is ended with pg_terminate_backend. nginx runs the shipped deploy/nginx/inferq.conf with only its
replica block and listen port substituted, in plain HTTP (tests/proxy_conf.py). With
``pgbouncer=True`` the replicas' pool goes through PgBouncer in transaction mode and only the
listener connects directly.

The database carries the e2e audit trail (tests/e2e/audit.py): every change of every task
with its OLD and NEW values, from which the checker verifies I2 and I5.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from inferq.db.cluster import PrivateCluster, free_port
from inferq.db.migrations import Migrator
from inferq.db.tokens import hash_token, new_secret
from tests.e2e import audit
from tests.e2e.proxies import find_binary, start_nginx, start_pgbouncer

POOL = "e2e"
MODEL = "echo-e2e"
DBNAME = "inferq"


def metric(base_url: str, name: str) -> float | None:
    """The value of the unlabelled series ``name`` of the daemon's /metrics; None when it is
    absent or the daemon does not answer."""
    try:
        text = httpx.get(base_url + "/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@dataclass
class Deployment:
    """The whole system under test; use ``Deployment.running(...)`` as a context manager."""

    workdir: Path
    replicas: int = 3
    workers: int = 4
    worker_capacity: int = 8
    echo_delay_s: float = 0.01
    pgbouncer: bool = False
    env_overrides: dict[str, str] = field(default_factory=dict)

    cluster: PrivateCluster = field(init=False)
    serve: list[Proc] = field(init=False, default_factory=list)
    worker_procs: list[Proc] = field(init=False, default_factory=list)
    nginx: Proc | None = field(init=False, default=None)
    bouncer: Proc | None = field(init=False, default=None)
    nginx_port: int = field(init=False, default=0)
    bouncer_port: int = field(init=False, default=0)
    tokens: dict[str, str] = field(init=False, default_factory=dict)

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def running(
        cls, failed: Callable[[], bool] = lambda: False, **kwargs: Any
    ) -> Iterator[Deployment]:
        """Start everything; stop everything on exit. The work directory (logs, history) is
        removed unless ``failed()`` says the test failed or INFERQ_E2E_KEEP is set."""
        workdir = Path(tempfile.mkdtemp(prefix="inferq-e2e-"))
        workdir.chmod(0o755)
        dep = cls(workdir=workdir, **kwargs)
        ok = False
        try:
            dep.start()
            yield dep
            ok = True
        finally:
            dep.stop()
            if ok and not failed() and not os.environ.get("INFERQ_E2E_KEEP"):
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"e2e logs kept in {workdir}", file=sys.stderr)

    def start(self) -> None:
        nginx_bin = find_binary("nginx")
        pgbouncer_bin = find_binary("pgbouncer") if self.pgbouncer else ""
        self._start_database()
        if self.pgbouncer:
            self.bouncer = start_pgbouncer(pgbouncer_bin, self.workdir, self.cluster.port, DBNAME)
            self.bouncer_port = self.bouncer.extra["port"]
        ports = [free_port() for _ in range(self.replicas)]
        for i, port in enumerate(ports):
            self.serve.append(self._serve_proc(i, port))
        for proc in self.serve:
            proc.start()
        for i in range(self.replicas):
            self.wait_replica_ready(i)
        self.nginx = start_nginx(nginx_bin, self.workdir, ports)
        self.nginx_port = self.nginx.extra["port"]
        for i in range(self.workers):
            proc = self._worker_proc(i)
            self.worker_procs.append(proc)
            proc.start()
        wait_until(
            lambda: self.live_sessions() >= self.workers, 30, f"{self.workers} worker sessions"
        )

    def stop(self) -> None:
        for proc in [*self.worker_procs, *self.serve]:
            with suppress(Exception):
                proc.stop()
        for other in (self.nginx, self.bouncer):
            if other is not None:
                with suppress(Exception):
                    other.stop()
        with suppress(Exception):
            self.cluster.stop("immediate")

    # -- database --------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return self.cluster.dsn_for(DBNAME)

    @property
    def pool_dsn(self) -> str:
        """What replicas use for their pool: PgBouncer when enabled, else PostgreSQL."""
        if self.pgbouncer:
            return f"postgresql://postgres@127.0.0.1:{self.bouncer_port}/{DBNAME}"
        return self.dsn

    def _start_database(self) -> None:
        pgdir = self.workdir / "pg"
        self.cluster = PrivateCluster(
            pgdir,
            # Durability stays on (fsync, synchronous_commit): the point is that nothing
            # acknowledged is lost across a restart.
            settings={"max_connections": "400", "log_min_messages": "warning"},
        )
        self.cluster.start()
        with psycopg.connect(self.cluster.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        Migrator(self.dsn).migrate()
        audit.install(self.dsn)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for role in ("client", "worker", "admin"):
                secret = new_secret()
                conn.execute(
                    "INSERT INTO inferq.api_token (token_hash, owner_id, role, label) "
                    "VALUES (%s, %s, %s, %s)",
                    (hash_token(secret), "e2e", role, f"e2e-{role}"),
                )
                self.tokens[role] = secret
            conn.execute(
                "INSERT INTO inferq.llm (name, pool_name, model) VALUES (%s, %s, %s)",
                (MODEL, POOL, MODEL),
            )

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on the database directly (not through PgBouncer)."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def restart_database(self) -> None:
        """`pg_ctl restart -m fast`: every connection of every replica is cut."""
        self.cluster.restart("fast")

    def live_sessions(self) -> int:
        try:
            rows = self.query("SELECT count(*) FROM inferq.worker_session WHERE expires_at > now()")
        except psycopg.Error:
            return 0
        return int(rows[0][0])

    def listener_backends(self) -> list[int]:
        """Backend pids of the replicas' LISTEN connections."""
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND (application_name ILIKE %s OR query ILIKE %s)",
            (DBNAME, "%listen%", "LISTEN%"),
        )
        return [int(r[0]) for r in rows]

    def terminate_listeners(self) -> list[int]:
        """pg_terminate_backend every LISTEN connection; the backend pids that were ended."""
        pids = self.listener_backends()
        return [pid for pid in pids if self.query("SELECT pg_terminate_backend(%s)", (pid,))[0][0]]

    def unfinished_tasks(self) -> int:
        rows = self.query(
            "SELECT count(*) FROM inferq.task WHERE status IN ('pending', 'claimed', 'running')"
        )
        return int(rows[0][0])

    # -- replicas --------------------------------------------------------------------------

    def _serve_env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        env.update(
            {
                "INFERQ_DATABASE_URL": self.pool_dsn,
                "INFERQ_HOST": "127.0.0.1",
                "INFERQ_PORT": str(port),
                "INFERQ_LOG_FORMAT": "json",
                "INFERQ_DATA_DIR": str(self.workdir / "data"),
                # Short leases and sweeps so a lost worker's task re-runs within seconds.
                "INFERQ_LEASE_S": "4",
                "INFERQ_SESSION_TTL_S": "4",
                "INFERQ_HEARTBEAT_S": "1",
                "INFERQ_MAINTENANCE_INTERVAL_S": "1",
                "INFERQ_SSE_HEARTBEAT_S": "2",
                "INFERQ_SAFETY_POLL_S": "3",
                # A drain lets open waits finish for this long, then answers 503 (clients retry).
                "INFERQ_DRAIN_GRACE_S": "3",
                "INFERQ_POOL_MAX_SIZE": "20",
                "INFERQ_MAX_ATTEMPTS": "5",
            }
        )
        if self.pgbouncer:
            env["INFERQ_LISTEN_DATABASE_URL"] = self.dsn
            env["INFERQ_PREPARED_STATEMENTS"] = "false"
        env.update(self.env_overrides)
        return env

    def _serve_proc(self, index: int, port: int) -> Proc:
        return Proc(
            f"replica{index}",
            [sys.executable, "-m", "inferq", "serve", "--host", "127.0.0.1", "--port", str(port)],
            self._serve_env(port),
            self.workdir / f"replica{index}.log",
            extra={"port": port},
        )

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.serve[index].extra['port']}"

    def wait_replica_ready(self, index: int, timeout_s: float = 30.0) -> None:
        self.serve[index].wait_http(self.replica_url(index) + "/readyz", timeout_s)

    def metric(self, index: int, name: str) -> float | None:
        """The value of an unlabelled series of a replica's /metrics (None if unreachable)."""
        return metric(self.replica_url(index), name)

    def open_waits(self, index: int) -> int:
        """Client waits and streams open on a replica now (its inferq_open_waits gauge)."""
        return int(self.metric(index, "inferq_open_waits") or 0)

    def kill_replica(self, index: int) -> None:
        """SIGKILL: no drain, no cleanup; its connections die with it."""
        self.serve[index].signal(signal.SIGKILL)
        self.serve[index].wait(10)

    def terminate_replica(self, index: int, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the graceful exit; the exit status."""
        self.serve[index].signal(signal.SIGTERM)
        return self.serve[index].wait(timeout_s)

    def restart_replica(self, index: int) -> None:
        """Start a dead replica again on the same port (nginx's upstream list is unchanged)."""
        proc = self.serve[index]
        if not proc.alive():
            proc.start()
        self.wait_replica_ready(index)

    def replica_of_pid(self, pid: int) -> int | None:
        for i, proc in enumerate(self.serve):
            if proc.alive() and proc.pid == pid:
                return i
        return None

    def maintenance_holders(self, sweep: str = "rescuer") -> list[str]:
        """Holders of ``sweep``'s live maintenance lease (holder names carry host:pid:rand)."""
        rows = self.query(
            "SELECT holder FROM inferq.maintenance_lease WHERE name = %s AND expires_at > now()",
            (sweep,),
        )
        return [str(r[0]) for r in rows]

    def leader_replica(self, sweep: str = "rescuer") -> int | None:
        """The live replica holding ``sweep``'s lease, matched by the pid in the holder name."""
        for holder in self.maintenance_holders(sweep):
            for i, proc in enumerate(self.serve):
                if proc.alive() and re.search(rf":{proc.pid}:", holder):
                    return i
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    # -- workers ---------------------------------------------------------------------------

    def _worker_proc(self, index: int) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        env["INFERQ_LOG_FORMAT"] = "json"
        env["INFERQ_WORKER_TOKEN"] = self.tokens["worker"]
        return Proc(
            f"worker{index}",
            [
                sys.executable,
                "-m",
                "inferq",
                "worker",
                "--url",
                self.url,
                "--pool",
                POOL,
                "--capacity",
                str(self.worker_capacity),
                "--backend",
                "echo",
                "--echo-delay",
                str(self.echo_delay_s),
                "--name",
                f"e2e-worker{index}",
            ],
            env,
            self.workdir / f"worker{index}.log",
        )

    def kill_worker(self, index: int) -> None:
        self.worker_procs[index].signal(signal.SIGKILL)
        self.worker_procs[index].wait(10)

    def restart_worker(self, index: int) -> None:
        if not self.worker_procs[index].alive():
            self.worker_procs[index].start()

    def worker_holding(self, task_ids: set[str]) -> tuple[int, str] | None:
        """(worker index, task id) of a live worker running one of ``task_ids`` right now."""
        rows = self.query(
            "SELECT t.id::text, s.name FROM inferq.task t "
            "JOIN inferq.worker_session s ON s.id = t.claimed_by "
            "WHERE t.status = 'running' AND t.id::text = ANY(%s)",
            (list(task_ids),),
        )
        for task_id, name in rows:
            m = re.fullmatch(r"e2e-worker(\d+)", str(name or ""))
            if m and self.worker_procs[int(m.group(1))].alive():
                return int(m.group(1)), task_id
        return None

    def logs(self) -> dict[str, str]:
        procs: list[Proc | None] = [*self.serve, *self.worker_procs, self.nginx, self.bouncer]
        return {p.name: p.log_text() for p in procs if p is not None}
