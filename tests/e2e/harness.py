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

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg

from inferq.db.cluster import UNPRIVILEGED_USER, PrivateCluster, free_port
from inferq.db.migrations import Migrator
from inferq.db.tokens import hash_token, new_secret
from tests import proxy_conf, system_packages
from tests.e2e import audit

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "inferq.conf"
POOL = "e2e"
MODEL = "echo-e2e"
DBNAME = "inferq"

T = TypeVar("T")


class HarnessError(RuntimeError):
    """The e2e deployment could not be set up (a missing binary, a process that died)."""


def find_binary(name: str) -> str:
    """The path of ``name`` (PATH, then /usr/sbin), installing its Debian package when it is
    missing and the tests may (tests/system_packages.py); else HarnessError naming it."""

    def where() -> str | None:
        return shutil.which(name) or (
            f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
        )

    path = where()
    if path is None:
        try:
            system_packages.install(name)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            raise HarnessError(
                f"{name} is not installed and the e2e suite needs it: {exc}"
            ) from None
        path = where()
    if path is None:
        raise HarnessError(f"{name} is still missing after installing it")
    return path


def wait_until(predicate: Callable[[], T], timeout_s: float = 30.0, what: str = "it") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; HarnessError
    naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(delay)  # the polling period of a deadline loop, not a wait for an event
        delay = min(delay * 1.5, 0.25)
    raise HarnessError(f"timed out after {timeout_s:.0f}s waiting for {what}")


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


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Proc:
    """One child process; its stdout and stderr go to one log file (appended to on restart)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, user: str | None = None) -> Proc:
        with self.log.open("ab") as out:
            out.write(f"\n=== start {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=user,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (after SIGCONT, for a stopped process), then SIGKILL after ``timeout_s``."""
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The JSON log lines (with ``event`` and the given fields) written so far."""
        found = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if event is not None and entry.get("event") != event:
                continue
            if all(entry.get(k) == v for k, v in match.items()):
                found.append(entry)
        return found

    def wait_event(self, event: str, timeout_s: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first log line of ``event`` with the given fields, once it is written."""

        def seen() -> dict[str, Any] | None:
            hits = self.events(event, **match)
            if not hits and not self.alive():
                raise HarnessError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return hits[0] if hits else None

        found: dict[str, Any] = wait_until(seen, timeout_s, f"{self.name} to log {event} {match}")
        return found


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
        self.nginx_bin = find_binary("nginx")
        if self.pgbouncer:
            self.pgbouncer_bin = find_binary("pgbouncer")
        self._start_database()
        if self.pgbouncer:
            self._start_pgbouncer()
        ports = [free_port() for _ in range(self.replicas)]
        for i, port in enumerate(ports):
            self.serve.append(self._serve_proc(i, port))
        for proc in self.serve:
            proc.start()
        for i in range(self.replicas):
            self.wait_replica_ready(i)
        self._start_nginx(ports)
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

    # -- PgBouncer -------------------------------------------------------------------------

    def _start_pgbouncer(self) -> None:
        bdir = self.workdir / "pgbouncer"
        bdir.mkdir()
        self.bouncer_port = free_port()
        (bdir / "userlist.txt").write_text('"postgres" ""\n')
        (bdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{DBNAME} = host=127.0.0.1 port={self.cluster.port} dbname={DBNAME}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.bouncer_port}\n"
            f"unix_socket_dir = {bdir}\n"
            "auth_type = trust\n"
            f"auth_file = {bdir}/userlist.txt\n"
            "pool_mode = transaction\n"
            "default_pool_size = 40\n"
            "max_client_conn = 1000\n"
            "server_reset_query =\n"
            "ignore_startup_parameters = extra_float_digits,options,statement_timeout\n"
        )
        user = None
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root.
            shutil.chown(bdir, UNPRIVILEGED_USER)
            user = UNPRIVILEGED_USER
        self.bouncer = Proc(
            "pgbouncer",
            [self.pgbouncer_bin, str(bdir / "pgbouncer.ini")],
            dict(os.environ),
            self.workdir / "pgbouncer.log",
        )
        self.bouncer.start(user=user)

        def answers() -> bool:
            try:
                with psycopg.connect(self.pool_dsn, connect_timeout=2, prepare_threshold=None):
                    return True
            except psycopg.Error:
                return False

        wait_until(answers, 20, "PgBouncer to accept connections")

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
        proc = self.serve[index]

        def ready() -> bool:
            if not proc.alive():
                raise HarnessError(f"{proc.name} exited:\n{proc.log_text()[-3000:]}")
            return _http_ok(self.replica_url(index) + "/readyz")

        wait_until(ready, timeout_s, f"{proc.name} /readyz")

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

    # -- nginx -----------------------------------------------------------------------------

    def _nginx_conf(self, ports: list[int]) -> str:
        # The shipped file, plain HTTP: the harness's clients and workers do not speak TLS
        # (tests/e2e/test_proxy_tls.py runs it with TLS).
        try:
            return proxy_conf.nginx(ports, self.nginx_port)
        except proxy_conf.ConfError as exc:
            raise HarnessError(f"{NGINX_CONF}: {exc}") from None

    def _start_nginx(self, ports: list[int]) -> None:
        ndir = self.workdir / "nginx"
        ndir.mkdir()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (ndir / sub).mkdir()
            (ndir / sub).chmod(0o777)
        self.nginx_port = free_port()
        (ndir / "inferq.conf").write_text(self._nginx_conf(ports))
        (ndir / "nginx.conf").write_text(
            "daemon off;\n"
            "worker_processes 1;\n"
            f"pid {ndir}/nginx.pid;\n"
            f"error_log {ndir}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            "    access_log off;\n"
            f"    client_body_temp_path {ndir}/client_body;\n"
            f"    proxy_temp_path {ndir}/proxy;\n"
            f"    fastcgi_temp_path {ndir}/fastcgi;\n"
            f"    uwsgi_temp_path {ndir}/uwsgi;\n"
            f"    scgi_temp_path {ndir}/scgi;\n"
            f"    include {ndir}/inferq.conf;\n"
            "}\n"
        )
        args = [self.nginx_bin, "-p", str(ndir), "-c", str(ndir / "nginx.conf")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise HarnessError(f"nginx -t rejected the configuration:\n{check.stderr}")
        self.nginx = Proc("nginx", args, dict(os.environ), self.workdir / "nginx.log")
        self.nginx.start()
        wait_until(lambda: _http_ok(self.url + "/healthz"), 20, "nginx to proxy /healthz")

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
