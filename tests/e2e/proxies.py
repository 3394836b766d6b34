"""The e2e deployment's two proxies: nginx in front of the replicas, PgBouncer before PostgreSQL.

nginx runs the shipped deploy/nginx/inferq.conf with only its replica block and listen port
substituted; PgBouncer runs in transaction mode, as the README's PgBouncer setup does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from inferq.db.cluster import UNPRIVILEGED_USER, free_port
from tests import proxy_conf, system_packages

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "inferq.conf"


class HarnessError(RuntimeError):
    """The e2e deployment could not be set up (a missing binary, a configuration that the
    shipped files no longer match)."""


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


# -- PgBouncer ------------------------------------------------------------------------------


def start_pgbouncer(binary: str, workdir: Path, postgres_port: int, dbname: str) -> Proc:
    """PgBouncer for ``dbname`` on a free port (``extra["port"]``), once it accepts
    connections; its files and log go in ``workdir``."""
    bdir = workdir / "pgbouncer"
    bdir.mkdir()
    port = free_port()
    (bdir / "userlist.txt").write_text('"postgres" ""\n')
    (bdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{dbname} = host=127.0.0.1 port={postgres_port} dbname={dbname}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
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
    bouncer = Proc(
        "pgbouncer",
        [binary, str(bdir / "pgbouncer.ini")],
        dict(os.environ),
        workdir / "pgbouncer.log",
        extra={"port": port},
    )
    bouncer.start(user=user)
    dsn = f"postgresql://postgres@127.0.0.1:{port}/{dbname}"

    def answers() -> bool:
        try:
            with psycopg.connect(dsn, connect_timeout=2, prepare_threshold=None):
                return True
        except psycopg.Error:
            return False

    with _stopped_on_error(bouncer):
        wait_until(answers, 20, "PgBouncer to accept connections")
    return bouncer


# -- nginx ----------------------------------------------------------------------------------


def nginx_conf(replica_ports: list[int], listen_port: int) -> str:
    """deploy/nginx/inferq.conf with these replicas and this listen port, in plain HTTP: the
    harness's clients and workers do not speak TLS (tests/e2e/test_proxy_tls.py runs it with
    TLS)."""
    try:
        return proxy_conf.nginx(replica_ports, listen_port)
    except proxy_conf.ConfError as exc:
        raise HarnessError(f"{NGINX_CONF}: {exc}") from None


def start_nginx(binary: str, workdir: Path, replica_ports: list[int]) -> Proc:
    """nginx on a free port (``extra["port"]``) balancing over ``replica_ports``, once it
    proxies /healthz; its files and log go in ``workdir``."""
    ndir = workdir / "nginx"
    ndir.mkdir()
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (ndir / sub).mkdir()
        (ndir / sub).chmod(0o777)
    port = free_port()
    (ndir / "inferq.conf").write_text(nginx_conf(replica_ports, port))
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
    args = [binary, "-p", str(ndir), "-c", str(ndir / "nginx.conf")]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise HarnessError(f"nginx -t rejected the configuration:\n{check.stderr}")
    nginx = Proc("nginx", args, dict(os.environ), workdir / "nginx.log", extra={"port": port})
    nginx.start()
    with _stopped_on_error(nginx):
        nginx.wait_http(f"http://127.0.0.1:{port}/healthz", 20)
    return nginx


@contextlib.contextmanager
def _stopped_on_error(proc: Proc) -> Iterator[None]:
    """Stop ``proc`` when the block fails: the caller never got hold of it to stop it."""
    try:
        yield
    except BaseException:
        proc.stop()
        raise
