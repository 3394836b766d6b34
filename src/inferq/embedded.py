"""The embedded default: a private PostgreSQL in INFERQ_DATA_DIR when no database URL is set.

The server comes from the local PostgreSQL binaries (inferq.db.cluster.PrivateCluster), else
from the ``pgserver`` wheel (``pip install 'inferq[embedded]'``). The first start creates the
cluster, applies the migrations and creates an admin token, printed once and kept in
``<data_dir>/admin-token`` (mode 0600); later starts reuse the same data and the same port.
As root the server runs as ``nobody``, so the data directory and its parents must be
traversable by others (the root default is /var/lib/inferq, see settings.default_data_dir).
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from inferq.db.cluster import PrivateCluster, find_bindir
from inferq.db.migrations import Migrator
from inferq.db.pool import create_pool
from inferq.db.tokens import TokenRepository
from inferq.errors import ConfigurationError
from inferq.settings import Settings

DATABASE = "inferq"
TOKEN_FILE = "admin-token"

_started: PrivateCluster | None = None
_pgserver: Any = None


def embedded_dsn(settings: Settings, *, announce: bool = True) -> str:
    """Start (or reuse) the private server of ``settings.data_dir``, migrate it, make sure an
    admin token exists, and return the DSN. Raises ConfigurationError when no server can run."""
    data_dir = settings.data_dir.expanduser().resolve()
    _prepare(data_dir)
    dsn = _cluster_dsn(data_dir) if find_bindir() is not None else _pgserver_dsn(data_dir)
    Migrator(dsn).migrate()
    secret = asyncio.run(_first_admin_token(settings, dsn))
    token_file = data_dir / TOKEN_FILE
    if secret is not None:
        token_file.write_text(secret + "\n")
        token_file.chmod(0o600)
    if announce:
        url = f"http://{settings.host}:{settings.port}"
        print(f"inferq: embedded PostgreSQL {dsn} (data in {data_dir})", file=sys.stderr)
        if secret is not None:
            print(f"inferq: admin token (shown once, kept in {token_file}): {secret}")
        else:
            print(f"inferq: admin token in {token_file}", file=sys.stderr)
        print(f"inferq: serving at {url}", file=sys.stderr)
        sys.stdout.flush()
    return dsn


def stop_embedded(*, only_if_started_here: bool = False) -> None:
    """Stop the server this process started (a server that was already running is left)."""
    global _started, _pgserver
    if _started is not None:
        _started.stop()
        _started = None
    if _pgserver is not None and not only_if_started_here:
        _pgserver.cleanup()
        _pgserver = None


def _prepare(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() != 0:
        return
    # PostgreSQL refuses root: the cluster runs as nobody, which must reach its directory
    # (initdb also reads it while resolving the path). Secrets in it are mode 0600.
    data_dir.chmod(data_dir.stat().st_mode | 0o055)
    for parent in data_dir.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ConfigurationError(
                f"{parent} is not traversable by other users, so the embedded PostgreSQL "
                f"(running as nobody) cannot reach {data_dir}; set INFERQ_DATA_DIR elsewhere, "
                "e.g. /var/lib/inferq"
            )


def _cluster_dsn(data_dir: Path) -> str:
    global _started
    cluster = PrivateCluster(data_dir / "postgres")
    already = (cluster.datadir / "PG_VERSION").exists() and cluster.running()
    cluster.start()
    if not already:
        _started = cluster
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if found.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    return cluster.dsn_for(DATABASE)


def _pgserver_dsn(data_dir: Path) -> str:
    global _pgserver
    try:
        import pgserver
    except ImportError:
        raise ConfigurationError(
            "no database: set INFERQ_DATABASE_URL, install the PostgreSQL server binaries, "
            "or `pip install 'inferq[embedded]'` for the pgserver wheel"
        ) from None
    _pgserver = pgserver.get_server(str(data_dir / "pgserver"), cleanup_mode="stop")
    return str(_pgserver.get_uri())


async def _first_admin_token(settings: Settings, dsn: str) -> str | None:
    """Create an admin token when there is no token at all; its secret, else None."""
    pool = create_pool(settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}), dsn)
    await pool.open(wait=True, timeout=15.0)
    try:
        tokens = TokenRepository(pool)
        if await tokens.count():
            return None
        _, secret = await tokens.create("admin", "admin", label="created by the first start")
        return secret
    finally:
        await pool.close()
