"""A real PostgreSQL for every test: a template database migrated once, cloned per test.

The server is, in this order: INFERQ_TEST_DATABASE_URL; a testcontainers PostgreSQL when a
Docker engine answers; a private throwaway cluster from the local server binaries (installed
from Debian's packages first when they are missing and the tests run as root); the
``pgserver`` wheel. When none can be had the database tests fail; they are never skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from inferq.db.cluster import PrivateCluster, find_bindir
from inferq.db.migrations import Migrator
from inferq.db.pool import create_pool
from inferq.settings import Settings
from tests import system_packages

# INFERQ_TEST_TEMPLATE: sessions of different checkouts sharing one server each need their own.
TEMPLATE = os.environ.get("INFERQ_TEST_TEMPLATE", "inferq_template")
_counter = itertools.count()


def _docker_answers() -> bool:
    """Whether a Docker engine answers /_ping (checked without the docker package's pools)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return True  # a remote engine: let testcontainers try it
    path = host.removeprefix("unix://")
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b" 200 " in sock.recv(64)
        except OSError:
            return False


def _with_db(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


@contextlib.contextmanager
def fast_cluster(prefix: str) -> Iterator[PrivateCluster]:
    """A started private cluster without durability (tests need none), destroyed after."""
    cluster = PrivateCluster(
        Path(tempfile.mkdtemp(prefix=prefix)),
        settings={"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"},
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def own_cluster() -> Iterator[PrivateCluster]:
    """A private PostgreSQL of this test alone, empty: the test may stop, restart or crash it
    (whatever server the rest of the suite uses)."""
    with fast_cluster("inferq-own-pg-") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """An object with ``dsn`` (a superuser DSN) and, for private clusters, restart()."""
    url = os.environ.get("INFERQ_TEST_DATABASE_URL")
    if url:
        yield _External(url)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as pg:
            yield _External(pg.get_connection_url())
        return
    if find_bindir() is None and system_packages.can_install():
        system_packages.install("postgresql", "postgresql-client")
    if find_bindir() is not None:
        with fast_cluster("inferq-test-pg-") as cluster:
            yield cluster
        return
    try:
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="inferq-test-pgserver-"))
        yield _External(server.get_uri())
        return
    except ImportError:
        pass
    pytest.fail(
        "no PostgreSQL for the tests: set INFERQ_TEST_DATABASE_URL, start Docker, install the "
        "PostgreSQL server binaries, or `pip install pgserver`"
    )


class _External:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def dsn_for(self, dbname: str) -> str:
        return _with_db(self.dsn, dbname)


@pytest.fixture(scope="session")
def template_dsn(pg_server: Any) -> str:
    """A database migrated once per session; tests clone it."""
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    dsn = pg_server.dsn_for(TEMPLATE)
    Migrator(dsn).migrate()
    return str(dsn)


@pytest.fixture
def dsn(pg_server: Any, template_dsn: str) -> Iterator[str]:
    """A fresh, migrated database for one test (a clone of the template)."""
    name = f"inferq_test_{os.getpid()}_{next(_counter)}"
    ident = sql.Identifier(name)
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                ident, sql.Identifier(TEMPLATE)
            )
        )
    yield str(pg_server.dsn_for(name))
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@pytest.fixture
def empty_dsn(pg_server: Any) -> Iterator[str]:
    """A database with no schema at all, for migration tests."""
    name = f"inferq_empty_{os.getpid()}_{next(_counter)}"
    ident = sql.Identifier(name)
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    yield str(pg_server.dsn_for(name))
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@pytest.fixture
def settings(dsn: str) -> Settings:
    return Settings(database_url=dsn, pool_min_size=1, pool_max_size=20)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p = create_pool(settings)
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()
