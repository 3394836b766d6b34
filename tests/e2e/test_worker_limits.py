"""An `inferq worker` process fed 512 MiB answers by the daemon and by its upstream.

The fake daemon (tests/fake_daemon.py) holds the answer until the worker is up and waiting
for it, the test reads the worker's peak resident set (VmHWM), then lets 512 MiB go. The
peak may grow by the configured limit plus a margin for the interpreter's own churn, and the
call fails with an error that names the limit.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from tests.fake_daemon import FakeDaemon, running

pytestmark = pytest.mark.e2e

LIMIT = 8 << 20
# Buffers and the bytearray's over-allocation (seen: 3.4 MiB over the limit).
MARGIN = 8 << 20


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with running(FakeDaemon()) as d:
        yield d


def start_worker(daemon: FakeDaemon, tmp_path: Path, *args: str) -> Proc:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {
        "INFERQ_LOG_FORMAT": "json",
        "INFERQ_WORKER_TOKEN": "worker-secret",
        "INFERQ_WORKER_MAX_RESPONSE_BYTES": str(LIMIT),
        "INFERQ_BACKEND_MAX_RESPONSE_BYTES": str(LIMIT),
        "INFERQ_BACKEND_MAX_LINE_BYTES": str(LIMIT),
    }
    argv = [sys.executable, "-m", "inferq", "worker", "--url", daemon.url, "--pool", "p", *args]
    return Proc("worker", argv, env, tmp_path / "worker.log").start()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_512_mib_claim_answer_costs_the_worker_at_most_the_limit(
    daemon: FakeDaemon, tmp_path: Path, chunked: bool
) -> None:
    daemon.claim_answer = daemon.big(chunked, b'{"tasks": [], "pad": "')
    worker = start_worker(daemon, tmp_path, "--backend", "echo")
    try:
        worker.wait_event("session_bound")
        wait_until(daemon.claimed.is_set, 30, "the worker's claim")
        before = peak_rss(worker.pid)
        daemon.go.set()
        failed = worker.wait_event("claim_failed", timeout_s=60)
        grown = peak_rss(worker.pid) - before
    finally:
        worker.stop()
    assert grown <= LIMIT + MARGIN, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    assert f"larger than the limit of {LIMIT} bytes" in failed["error"]


@pytest.mark.parametrize("streaming", [False, True], ids=["answer", "stream-line"])
def test_a_512_mib_upstream_answer_fails_the_task_within_the_limit(
    daemon: FakeDaemon, tmp_path: Path, streaming: bool
) -> None:
    task_id = str(uuid.uuid4())
    daemon.tasks_on_bind = [
        {
            "id": task_id,
            "attempt": 1,
            "pool": "p",
            "model": "m",
            "streaming": streaming,
            "request": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        }
    ]
    # A stream whose first line never ends, or one JSON answer that never ends.
    daemon.upstream_answer = daemon.big(True, b"data: " if streaming else b'{"pad": "')
    worker = start_worker(daemon, tmp_path, "--backend", daemon.url + "/up/v1")
    try:
        wait_until(daemon.upstream_called.is_set, 30, "the worker's upstream request")
        before = peak_rss(worker.pid)
        daemon.go.set()
        worker.wait_event("task_failed", timeout_s=60, task_id=task_id)
        grown = peak_rss(worker.pid) - before
    finally:
        worker.stop()
    assert grown <= LIMIT + MARGIN, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    (outcome,) = daemon.outcomes
    what = "an event line of its stream" if streaming else "its answer"
    assert (
        outcome["error"]
        == f"the upstream server sent {what} larger than the limit of {LIMIT} bytes"
    )
    assert daemon.url not in outcome["error"]
