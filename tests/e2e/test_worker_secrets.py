"""`inferq worker` and its secrets: never on argv, read from files or the environment, never
logged; plain http:// only to this host unless --insecure-http. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferq.bench.polling import wait_until
from inferq.db.cluster import free_port
from inferq.db.tokens import new_secret
from tests import fake_upstream
from tests.e2e.procs import POOL, REPO, Stack, words

pytestmark = pytest.mark.e2e


def inferq_worker(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `inferq worker ARGS` expecting it to refuse to start (it would run forever)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    argv = [sys.executable, "-m", "inferq", "worker", "--pool", "p", *args]
    return subprocess.run(
        argv, env=base | (env or {}), capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("flag", "instead"),
    [
        ("--token", "INFERQ_WORKER_TOKEN or --token-file"),
        ("--backend-api-key", "INFERQ_BACKEND_API_KEY or --backend-api-key-file"),
    ],
)
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_a_secret_on_argv_is_refused_naming_what_to_use(flag: str, instead: str, form: str) -> None:
    secret = ["--url", "http://127.0.0.1:1"]
    secret += [f"{flag}=s3cr3t"] if form == "equals" else [flag, "s3cr3t"]
    done = inferq_worker(*secret, env={"INFERQ_WORKER_TOKEN": "t"})
    assert done.returncode == 2
    assert f"{flag} is not accepted" in done.stderr and instead in done.stderr


def test_no_token_is_a_clear_error() -> None:
    done = inferq_worker("--url", "http://127.0.0.1:1")
    assert done.returncode == 2
    assert "set INFERQ_WORKER_TOKEN or pass --token-file" in done.stderr


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://inferq.example:8000", True),
        ("http://10.1.2.3:8000", True),
        ("http://127.0.0.1:1", False),
        ("http://127.8.9.10:1", False),
        ("http://[::1]:1", False),
        ("http://localhost:1", False),
    ],
)
def test_plain_http_to_another_host_needs_insecure_http(url: str, refused: bool) -> None:
    # The refusal comes before any connection; a worker that is not refused is recognised
    # by its first log line (it then waits for a daemon that is not there, and is killed).
    env = {"INFERQ_WORKER_TOKEN": "t", "INFERQ_LOG_FORMAT": "json"}
    for extra in ([], ["--insecure-http"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferq", "worker", "--pool", "p", "--url", url, *extra],
            env={k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")} | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            first = proc.stdout.readline() if proc.stdout else ""
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        if refused and not extra:
            assert "plain http:// to" in first and "--insecure-http" in first, first
        else:
            assert '"worker_started"' in first, first


def test_secret_files_are_read_and_never_logged(stack: Stack, tmp_path: Path) -> None:
    api_key = new_secret()
    port = free_port()
    argv = [sys.executable, str(REPO / "tests" / "fake_upstream.py"), "--port", str(port)]
    upstream = stack.spawn("upstream", [*argv, "--api-key", api_key])
    wait_until(lambda: "ready" in upstream.log_text(), 30, "the fake upstream")
    token_file, key_file = tmp_path / "token", tmp_path / "key"
    token_file.write_text(stack.worker_token + "\n")
    key_file.write_text(api_key)
    for f in (token_file, key_file):
        f.chmod(0o600)
    argv = [sys.executable, "-m", "inferq", "worker", "--url", stack.url, "--pool", POOL]
    argv += ["--token-file", str(token_file), "--backend", f"http://127.0.0.1:{port}/v1"]
    argv += ["--backend-api-key-file", str(key_file)]
    env = stack.base_env() | {"INFERQ_LOG_LEVEL": "debug"}  # no INFERQ_WORKER_TOKEN
    worker = stack.spawn("worker", argv, env)
    worker.wait_event("session_bound")  # the token from the file was accepted
    task_id = stack.submit(words(3))["id"]
    done = stack.wait_task(task_id)
    # The upstream refuses a request without its key: the key from the file was sent.
    assert done["status"] == "completed", done["error"]
    assert done["response"]["choices"][0]["message"]["content"] == fake_upstream.REPLY
    worker.stop()
    log = worker.log_text()
    assert stack.worker_token not in log and api_key not in log
    assert worker.events("secret_file_shared") == []
