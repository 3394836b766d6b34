"""The README's SDK worker, run as written (its daemon URL pointed at the test's), against a real
daemon: it streams, fails a task with its own message, and stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import sys

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from inferq.bench.polling import wait_until
from tests.e2e.procs import MODEL, REPO, Stack

pytestmark = pytest.mark.e2e


def readme_worker() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A worker in Python (the SDK)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's SDK section has no python block"
    return match.group(1)


def test_the_readme_sdk_worker_streams_fails_and_stops(stack: Stack) -> None:
    code = readme_worker().replace("http://127.0.0.1:8000", stack.url)
    script = stack.workdir / "readme_worker.py"
    script.write_text(code)
    env = stack.base_env() | {"INFERQ_WORKER_TOKEN": stack.worker_token}
    worker = stack.spawn("readme-worker", [sys.executable, str(script)], env)
    # The script logs with structlog's defaults (console lines): the database tells when it
    # has bound.
    wait_until(
        lambda: (
            stack.query("SELECT count(*) FROM inferq.worker_session") == [(1,)]
            or not worker.alive()
        ),
        30,
        "the README worker's session",
    )
    assert worker.alive(), worker.log_text()

    client = OpenAI(base_url=stack.url + "/v1", api_key=stack.client_token, max_retries=0)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "tokens from a model in this process"}
    ]
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.split() == ["tokens", "from", "a", "model", "in", "this", "process"]

    failed = stack.submit("")
    assert stack.wait_task(failed["id"])["error"] == "empty prompt"

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert "session_unbound" in worker.log_text()
