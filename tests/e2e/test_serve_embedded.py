"""`inferq serve` as a real process with no database URL: the embedded PostgreSQL path."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inferq.db.cluster import PrivateCluster
from tests.api_helpers import MODEL, POOL, EchoWorker, auth, running_worker

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is 0700, and the embedded server runs as nobody.
    path = Path(tempfile.mkdtemp(prefix="inferq-serve-"))
    yield path
    PrivateCluster(path / "postgres").stop("immediate")
    shutil.rmtree(path, ignore_errors=True)


def start(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(
        INFERQ_DATA_DIR=str(data_dir),
        INFERQ_DRAIN_DELAY_S="0.1",
        INFERQ_SHUTDOWN_GRACE_S="5",
        INFERQ_LOG_FORMAT="json",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "inferq", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str], url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("inferq serve did not become ready")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


async def test_serve_without_database_url(data_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(data_dir, port)
    try:
        wait_ready(proc, url)
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

    proc = start(data_dir, port)
    try:
        wait_ready(proc, url)
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.get(f"/v1/tasks/{task_id}", headers=auth(client))
        assert r.status_code == 200
        assert r.json()["status"] == "completed"
    finally:
        out = stop(proc)
    assert admin not in out  # the second start reuses the data and its token
