"""Real processes for the worker end-to-end tests: one `inferq serve`, `inferq worker`s, upstreams.

Each test gets its own migrated database (the ``dsn`` fixture) carrying the e2e audit trail
(tests/e2e/audit.py), a daemon on a free port with short leases so rescue happens in seconds,
tokens written straight into the database, and helpers that read the workers' JSON log lines.
Nothing here sleeps to wait: every wait polls a predicate against a deadline.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from inferq.db.cluster import free_port
from inferq.db.tokens import hash_token, new_secret
from tests.e2e import audit
from tests.e2e.harness import metric

REPO = Path(__file__).resolve().parents[2]
POOL = "default"
MODEL = "echo"

# Short enough that a dead worker's task runs elsewhere within a few seconds.
FAST_LEASES = {
    "INFERQ_LEASE_S": "2",
    "INFERQ_SESSION_TTL_S": "2",
    "INFERQ_HEARTBEAT_S": "0.5",
    "INFERQ_MAINTENANCE_INTERVAL_S": "0.5",
    "INFERQ_SSE_HEARTBEAT_S": "1",
    "INFERQ_SAFETY_POLL_S": "2",
}


@dataclass
class Stack:
    """One daemon over the test's database, plus the workers and upstreams a test starts."""

    dsn: str
    env_overrides: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="inferq-e2e-")))
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    client_token: str = ""
    worker_token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        env["INFERQ_LOG_FORMAT"] = "json"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> Stack:
        audit.install(self.dsn)
        self.client_token = self.add_token("client-owner", "client")
        self.worker_token = self.add_token("gpu-box", "worker")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO inferq.llm (name, pool_name, model, tier) VALUES (%s, %s, %s, %s)",
                (MODEL, POOL, MODEL, "standard"),
            )
        self.port = free_port()
        env = self.base_env() | {
            "INFERQ_DATABASE_URL": self.dsn,
            "INFERQ_HOST": "127.0.0.1",
            "INFERQ_PORT": str(self.port),
            "INFERQ_DATA_DIR": str(self.workdir / "data"),
            **FAST_LEASES,
            **self.env_overrides,
        }
        serve = self.spawn("serve", [sys.executable, "-m", "inferq", "serve"], env)
        serve.wait_http(self.url + "/readyz", 60)
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        index = len(self.procs)
        log = self.workdir / f"{index:02d}-{name}.log"
        proc = Proc(name, argv, env or self.base_env(), log).start()
        self.procs.append(proc)
        return proc

    def add_token(self, owner: str, role: str) -> str:
        secret = new_secret()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO inferq.api_token (token_hash, owner_id, role, label) "
                "VALUES (%s, %s, %s, %s)",
                (hash_token(secret), owner, role, "e2e"),
            )
        return secret

    def worker(
        self,
        *args: str,
        capacity: int = 1,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start ``inferq worker`` on POOL; ``args`` add e.g. --backend or --echo-delay."""
        name = name or f"worker{len(self.procs)}"
        argv = [sys.executable, "-m", "inferq", "worker", "--url", self.url]
        argv += ["--pool", POOL, "--capacity", str(capacity)]
        argv += ["--name", name, *args]
        secret = {"INFERQ_WORKER_TOKEN": self.worker_token}
        return self.spawn(name, argv, self.base_env() | secret | (env or {}))

    def upstream(self, mode: str, delay_s: float = 0.01) -> str:
        """Start tests/fake_upstream.py; its base URL."""
        port = free_port()
        script = str(REPO / "tests" / "fake_upstream.py")
        argv = [sys.executable, script, "--port", str(port), "--mode", mode]
        proc = self.spawn(f"upstream-{mode}", [*argv, "--delay", str(delay_s)])
        wait_until(lambda: "ready" in proc.log_text(), 30, "the fake upstream")
        return f"http://127.0.0.1:{port}/v1"

    # -- client side --------------------------------------------------------------------------

    def http(self, token: str | None = None, timeout_s: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.client_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def submit(self, text: str, *, streaming: bool = False, **extra: Any) -> dict[str, Any]:
        body = {"model": MODEL, "streaming": streaming, **extra}
        body["request"] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        with self.http() as http:
            resp = http.post("/v1/tasks", json=body)
        assert resp.status_code == 201, resp.text
        task: dict[str, Any] = resp.json()
        return task

    def task(self, task_id: str) -> dict[str, Any]:
        with self.http() as http:
            resp = http.get(f"/v1/tasks/{task_id}")
        assert resp.status_code == 200, resp.text
        task: dict[str, Any] = resp.json()
        return task

    def wait_task(self, task_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        def terminal() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if task["status"] in ("completed", "error", "cancelled") else None

        found: dict[str, Any] = wait_until(terminal, timeout_s, f"task {task_id} to end")
        return found

    def events(self, task_id: str) -> Iterator[tuple[str, str | None, Any]]:
        """The task's native SSE stream as (event, id, data) until it ends."""
        with self.http() as http, http.stream("GET", f"/v1/tasks/{task_id}/events") as resp:
            assert resp.status_code == 200, resp.read()
            data: list[str] = []
            event, event_id = "message", None
            for line in resp.iter_lines():
                if line.startswith(":"):
                    continue
                if not line:
                    if data:
                        yield event, event_id, json.loads("\n".join(data))
                    event, event_id, data = "message", None, []
                    continue
                key, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if key == "event":
                    event = value
                elif key == "id":
                    event_id = value
                elif key == "data":
                    data.append(value)

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled series of the daemon's /metrics (None if unreachable)."""
        return metric(self.url, name)

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()


def words(n: int) -> str:
    """A message of ``n`` distinct words."""
    return " ".join(f"w{i}" for i in range(1, n + 1))
