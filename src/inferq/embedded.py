"""The embedded default: a private PostgreSQL in INFERQ_DATA_DIR when no database URL is set.

The server comes from the local PostgreSQL binaries (inferq.db.cluster.PrivateCluster), else
from the ``pgserver`` wheel (``pip install 'inferq[embedded]'``). The first start creates the
cluster, applies the migrations and creates an admin token; later starts reuse the same data
and the same port.

Secrets: the cluster admits no one without the superuser's password (SCRAM over the socket
and 127.0.0.1 alike, see PrivateCluster), which is generated at the first start and kept in
``<data_dir>/pgpass`` (libpq's pgpass format); the admin token is kept in
``<data_dir>/admin-token``. Both files are created with mode 0600 from their first byte
(``os.open(O_CREAT | O_EXCL, 0o600)``: never a moment with a wider mode) and neither secret is
ever printed or logged: the first start says where the token file is. As root the server runs
as ``nobody``, so the data directory gets the others' search bit (0711: traversable, not
listable) and its parents must be traversable (the root default is /var/lib/inferq, see
settings.default_data_dir).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from inferq.db.cluster import PrivateCluster, find_bindir, pgpass_line
from inferq.db.migrations import Migrator
from inferq.db.pool import create_pool
from inferq.db.tokens import TokenRepository
from inferq.errors import ConfigurationError
from inferq.settings import Settings

DATABASE = "inferq"
TOKEN_FILE = "admin-token"
PASSFILE = "pgpass"

_started: PrivateCluster | None = None
_pgserver: Any = None


def embedded_dsn(settings: Settings, *, announce: bool = True) -> str:
    """Start (or reuse) the private server of ``settings.data_dir``, migrate it, make sure an
    admin token exists, and return the DSN. Raises ConfigurationError when no server can run."""
    data_dir = settings.data_dir.expanduser().resolve()
    _prepare(data_dir)
    dsn = _cluster_dsn(data_dir) if find_bindir() is not None else _pgserver_dsn(data_dir)
    Migrator(dsn).migrate()
    token_file = data_dir / TOKEN_FILE
    secret = asyncio.run(_first_admin_token(settings, dsn))
    created = secret is not None
    if secret is not None:
        # A token file left from an earlier data directory names no live token: replace it.
        token_file.unlink(missing_ok=True)
        write_secret_file(token_file, secret + "\n")
    if announce:
        url = f"http://{settings.host}:{settings.port}"
        print(f"inferq: embedded PostgreSQL {dsn} (data in {data_dir})", file=sys.stderr)
        made = "created an admin token; it is" if created else "the admin token is"
        print(f"inferq: {made} in {token_file} (mode 0600, shown nowhere else)", file=sys.stderr)
        print(f"inferq: serving at {url}", file=sys.stderr)
    return dsn


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, mode 0600 from its first byte; FileExistsError when
    it exists (a secret is never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


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
    # PostgreSQL refuses root: the cluster runs as nobody, which must traverse this directory
    # to reach its own (0700) one. Search, not read: the directory cannot be listed by others,
    # and the secrets in it are 0600 anyway.
    data_dir.chmod(0o711)
    for parent in data_dir.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ConfigurationError(
                f"{parent} is not traversable by other users, so the embedded PostgreSQL "
                f"(running as nobody) cannot reach {data_dir}; set INFERQ_DATA_DIR elsewhere, "
                "e.g. /var/lib/inferq"
            )


def _cluster_dsn(data_dir: Path) -> str:
    global _started
    passfile = data_dir / PASSFILE
    if not passfile.exists():
        write_secret_file(passfile, pgpass_line(secrets.token_urlsafe(32)))
    cluster = PrivateCluster(data_dir / "postgres", passfile=passfile)
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
