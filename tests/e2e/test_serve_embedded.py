"""`inferq serve` as a real process with no database URL: the embedded PostgreSQL path."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inferq.bench.processes import Proc
from inferq.db.cluster import PrivateCluster, free_port
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
        INFERQ_SHUTDOWN_GRACE_S="5",
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
    assert admin in out  # printed once, on the first start

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
