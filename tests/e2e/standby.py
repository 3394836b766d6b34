"""FailoverDeployment: the e2e Deployment over a primary and a synchronous streaming standby.

The primary is the harness's own PrivateCluster; the standby is a ``pg_basebackup`` of it
(with a replication slot) started with ``standby.signal`` and a ``primary_conninfo`` naming it
``inferq_standby``. Once the standby streams, the primary is made synchronous
(``ALTER SYSTEM SET synchronous_standby_names``), so from then on a commit is acknowledged only
after the standby has flushed it: the drill's "nothing acknowledged is lost" rests on that.
The setting lives in the primary's own ``postgresql.auto.conf``, taken after the base backup,
so the promoted standby does not inherit it (with no standby of its own, a synchronous new
primary would block every commit). The chunk table is made LOGGED before the base backup:
UNLOGGED (the schema's default) it is not replicated, and streams in flight would lose their
earlier chunks at the promotion (README, "Failover").

Everything connects through one multi-host DSN, primary first:
``postgresql://postgres@127.0.0.1:P1,127.0.0.1:P2/inferq?target_session_attrs=read-write``.
libpq tries the hosts in order and, with ``read-write``, refuses a server in recovery, so a
replica's pool and listener reach whichever server is the primary now. ``fail_over()`` stops
the primary the way a crash does (``pg_ctl stop -m immediate``: no shutdown checkpoint, no
last WAL sent), waits for ``detected()`` (the stand-in for a failover manager's detection
delay, during which the standby still refuses writes), then ``pg_ctl promote``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from inferq.bench.polling import wait_until
from inferq.db.cluster import UNPRIVILEGED_USER, PrivateCluster, free_port
from tests.e2e.harness import DBNAME, Deployment
from tests.e2e.proxies import HarnessError

STANDBY_NAME = "inferq_standby"  # the standby's application_name, and its replication slot


@dataclass(frozen=True)
class FailoverTimes:
    """Monotonic instants of one failover (time.monotonic())."""

    stop_started: float
    primary_stopped: float
    detected: float
    promoted: float

    @property
    def primary_down_s(self) -> float:
        """From the stop of the primary to a promoted standby: no server accepted writes."""
        return self.promoted - self.stop_started


@dataclass
class FailoverDeployment(Deployment):
    """A Deployment whose database is a primary plus a synchronous standby; see the module
    docstring. ``target_session_attrs=None`` leaves the attribute out of the DSN (the broken
    configuration the drill must catch)."""

    target_session_attrs: str | None = "read-write"
    standby: PrivateCluster | None = field(init=False, default=None)
    old_primary: PrivateCluster | None = field(init=False, default=None)
    standby_port: int = field(init=False, default=0)
    primary_port: int = field(init=False, default=0)

    @property
    def dsn(self) -> str:
        """The multi-host DSN everything uses, primary first (see the module docstring)."""
        primary = self.primary_port or self.cluster.port  # set once the primary is up
        hosts = ",".join(f"127.0.0.1:{p}" for p in (primary, self.standby_port))
        options = "connect_timeout=2"
        if self.target_session_attrs:
            options += f"&target_session_attrs={self.target_session_attrs}"
        return f"postgresql://postgres@{hosts}/{DBNAME}?{options}"

    # -- setup -----------------------------------------------------------------------------

    def _start_database(self) -> None:
        self.standby_port = free_port()
        super()._start_database()  # the primary, its database, schema, audit and tokens
        self.primary_port = self.cluster.port
        # An UNLOGGED table is not replicated: the promoted standby would have no chunks of
        # the streams in flight (see README, "Failover"). The deployment this drill stands
        # for makes the chunk table logged.
        self.query("ALTER TABLE inferq.task_chunk SET LOGGED")
        self._start_standby()

    def _start_standby(self) -> None:
        # The same settings as the primary: a hot standby refuses to start with fewer
        # max_connections than its primary.
        standby = self.standby = PrivateCluster(
            self.workdir / "pg-standby", port=self.standby_port, settings=self.cluster.settings
        )
        directory = standby.directory
        directory.mkdir()
        if os.geteuid() == 0:
            shutil.chown(directory, UNPRIVILEGED_USER)
        self._pg(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(self.cluster.port), "-U", "postgres"),
            *("-D", str(standby.datadir), "-X", "stream", "-c", "fast"),
            *("-C", "-S", STANDBY_NAME),
        )
        conninfo = (
            f"host=127.0.0.1 port={self.cluster.port} user=postgres application_name={STANDBY_NAME}"
        )
        (standby.datadir / "standby.signal").write_text("")
        with (standby.datadir / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"primary_conninfo = '{conninfo}'\nprimary_slot_name = '{STANDBY_NAME}'\n")
        if os.geteuid() == 0:
            shutil.chown(standby.datadir / "standby.signal", UNPRIVILEGED_USER)
        standby.start()  # finds the data directory: no initdb
        # Synchronous from here on: a commit waits for the standby's flush.
        self.primary_query(
            sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                sql.Literal(STANDBY_NAME)
            )
        )
        self.primary_query(sql.SQL("SELECT pg_reload_conf()"))
        wait_until(lambda: self.sync_state() == "sync", 30, "the standby to be synchronous")

    def _pg(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the clusters' user; HarnessError with its output."""
        assert self.cluster.bindir is not None
        user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
        done = subprocess.run(
            [str(self.cluster.bindir / program), *args],
            user=user,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            timeout=120,
        )
        if done.returncode != 0:
            raise HarnessError(f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done

    # -- state -----------------------------------------------------------------------------

    def primary_query(self, statement: sql.SQL | sql.Composed, params: Any = None) -> list[Any]:
        """One statement on the original primary's ``postgres`` database."""
        with psycopg.connect(self.cluster.dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def sync_state(self) -> str | None:
        """The standby's ``pg_stat_replication.sync_state`` on the primary (sync, async...)."""
        rows = self.primary_query(
            sql.SQL(
                "SELECT sync_state FROM pg_stat_replication "
                "WHERE application_name = %s AND state = 'streaming'"
            ),
            (STANDBY_NAME,),
        )
        return str(rows[0][0]) if rows else None

    def in_recovery(self, port: int) -> bool | None:
        """pg_is_in_recovery() of the server on ``port``; None when it does not answer."""
        try:
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{port}/{DBNAME}", connect_timeout=2
            ) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return None
        return bool(row and row[0])

    # -- the fault -------------------------------------------------------------------------

    def fail_over(self, detected: Callable[[], bool]) -> FailoverTimes:
        """Crash the primary, wait until ``detected()`` (the deadline is 30 s), promote the
        standby and return the instants. From then on ``cluster`` is the new primary."""
        started = time.monotonic()
        self._pg("pg_ctl", "-D", str(self.cluster.datadir), "-m", "immediate", "-w", "stop")
        stopped = time.monotonic()
        wait_until(detected, 30, "the replicas to notice the primary is gone")
        seen = time.monotonic()
        assert self.standby is not None
        self._pg("pg_ctl", "-D", str(self.standby.datadir), "-w", "-t", "30", "promote")
        promoted = time.monotonic()
        self.old_primary, self.cluster = self.cluster, self.standby
        return FailoverTimes(started, stopped, seen, promoted)

    def stop(self) -> None:
        super().stop()  # replicas, workers, nginx, and ``cluster`` (the primary now)
        for cluster in (self.standby, self.old_primary):
            if cluster is not None and Path(cluster.datadir).exists():
                cluster.stop("immediate")
