"""`inferq serve` as a real process with no database URL: the embedded PostgreSQL path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from inferq.bench.processes import Proc
from inferq.db.cluster import PrivateCluster, find_bindir, free_port
from inferq.embedded import write_secret_file
from tests.api_helpers import MODEL, POOL, EchoWorker, auth, running_worker

pytestmark = pytest.mark.e2e


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is 0700, and the embedded server runs as nobody.
    path = Path(tempfile.mkdtemp(prefix="inferq-serve-"))
    yield path
    PrivateCluster(path / "postgres").stop("immediate")
    shutil.rmtree(path, ignore_errors=True)


def start(data_dir: Path, port: int, log: Path) -> Proc:
    """`inferq serve` on ``port``; its output goes to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(
        INFERQ_DATA_DIR=str(data_dir),
        INFERQ_DRAIN_DELAY_S="0.1",
        INFERQ_DRAIN_GRACE_S="5",
        INFERQ_LOG_FORMAT="json",
    )
    argv = [sys.executable, "-m", "inferq", "serve", "--port", str(port)]
    return Proc("serve", argv, env, log).start()


def stop(proc: Proc) -> str:
    """SIGTERM, and what it printed; it must exit 0."""
    proc.signal(signal.SIGTERM)
    code = proc.wait(15)
    out = proc.log_text()
    assert code == 0, out
    return out


async def test_serve_without_database_url(data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(data_dir, port, tmp_path / "first.log")
    try:
        proc.wait_http(url + "/readyz", 60)
        admin = (data_dir / "admin-token").read_text().strip()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            r = await http.post(
                "/v1/admin/llms", json={"name": MODEL, "pool": POOL}, headers=auth(admin)
            )
            assert r.status_code == 201, r.text
            worker = (
                await http.post(
                    "/v1/admin/tokens",
                    json={"owner": "gpus", "role": "worker"},
                    headers=auth(admin),
                )
            ).json()["secret"]
            client = (
                await http.post("/v1/admin/tokens", json={"owner": "me"}, headers=auth(admin))
            ).json()["secret"]
            async with running_worker(EchoWorker(url, worker)):
                r = await http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    headers=auth(client),
                )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
            task_id = r.headers["x-inferq-task-id"]
    finally:
        out = stop(proc)
    # The first start says where the token is, never what it is (stdout and stderr alike).
    assert admin not in out
    assert f"{data_dir / 'admin-token'} (mode 0600" in out

    proc = start(data_dir, port, tmp_path / "second.log")
    try:
        proc.wait_http(url + "/readyz", 60)
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.get(f"/v1/tasks/{task_id}", headers=auth(client))
        assert r.status_code == 200
        assert r.json()["status"] == "completed"
    finally:
        out = stop(proc)
    assert admin not in out  # the second start reuses the data and its token
    assert (data_dir / "admin-token").read_text().strip() == admin


def _modes(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _psql(user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """psql as ``user`` (runuser, when root), never prompting for a password."""
    psql = str(find_bindir() / "psql")  # type: ignore[operator]
    argv = [psql, "-w", "-X", "-At", "-U", "postgres", "-d", "inferq", "-c", "SELECT 1", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", check=False)


def test_the_embedded_database_admits_no_one_without_its_password(
    data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    proc = start(data_dir, port, tmp_path / "serve.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/readyz", 60)
        cluster_dir = data_dir / "postgres"
        pg_port = int((cluster_dir / "port").read_text())
        passfile = data_dir / "pgpass"
        password = passfile.read_text().strip().rsplit(":", 1)[1]
        tcp = f"host=127.0.0.1 port={pg_port} user=postgres dbname=inferq"
        # Over TCP: nothing without the password, nothing with a wrong one.
        for attempt in ("", " password=wrong"):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(tcp + attempt, connect_timeout=5).close()
        with psycopg.connect(tcp, password=password) as conn:
            rules = conn.execute(
                "SELECT type, auth_method FROM pg_hba_file_rules ORDER BY line_number"
            ).fetchall()
            listen = conn.execute("SHOW listen_addresses").fetchone()
            socket_mode = conn.execute("SHOW unix_socket_permissions").fetchone()
        socket_file = cluster_dir / f".s.PGSQL.{pg_port}"
        socket_is_private = socket_file.is_socket() and _modes(socket_file) == 0o700
        # Another local user: the socket directory is closed to it, and TCP asks a password.
        other = "daemon" if os.geteuid() == 0 else None
        by_socket = _psql(other, "-h", str(cluster_dir), "-p", str(pg_port))
        by_tcp = _psql(other, "-h", "127.0.0.1", "-p", str(pg_port))
    finally:
        stop(proc)
    assert {method for _, method in rules} == {"scram-sha-256"}
    assert {kind for kind, _ in rules} == {"local", "host"}
    assert listen == ("127.0.0.1",)
    assert socket_mode == ("0700",)
    assert socket_is_private
    assert _modes(cluster_dir) == 0o700
    assert _modes(cluster_dir / "data") == 0o700
    assert _modes(passfile) == 0o600 and _modes(data_dir / "admin-token") == 0o600
    assert not _modes(data_dir) & 0o066  # others may traverse it (root), never list it
    assert by_socket.returncode != 0 and by_tcp.returncode != 0
    if other is not None:
        assert "Permission denied" in by_socket.stderr, by_socket.stderr
    assert "password" in by_tcp.stderr, by_tcp.stderr


def test_a_trusting_cluster_of_an_older_inferq_is_locked_at_its_next_start(
    data_dir: Path, tmp_path: Path
) -> None:
    data_dir.chmod(0o755)  # as an older inferq left it
    old = PrivateCluster(data_dir / "postgres")  # trust, as inferq made it before
    old.start()
    with psycopg.connect(old.dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE inferq")
    old.stop()
    port = free_port()
    proc = start(data_dir, port, tmp_path / "serve.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/readyz", 60)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(old.dsn, connect_timeout=5).close()
        with psycopg.connect(
            PrivateCluster(data_dir / "postgres", passfile=data_dir / "pgpass").dsn_for("inferq")
        ) as conn:
            methods = conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
    finally:
        stop(proc)
    assert methods == [("scram-sha-256",)]
    assert _modes(data_dir / "postgres") == 0o700


def test_secret_files_are_0600_from_their_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No later chmod may be what makes the file private: with chmod disabled and the most
    # permissive umask, the file is still 0600, and an existing secret is never overwritten.
    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("a secret file must not need a chmod")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    previous = os.umask(0)
    try:
        write_secret_file(tmp_path / "secret", "s3cret\n")
    finally:
        os.umask(previous)
    assert _modes(tmp_path / "secret") == 0o600
    assert (tmp_path / "secret").read_text() == "s3cret\n"
    with pytest.raises(FileExistsError):
        write_secret_file(tmp_path / "secret", "other\n")
