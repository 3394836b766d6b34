"""A rolling restart loses no generation (issue #13, points 1 and 2), with real processes: the
replica serving a keyed OpenAI call gets SIGTERM while the worker generates; the call ends with
503 at the end of the drain's grace, and the client's retry with the same Idempotency-Key on
the other replica attaches to the same task — one task, attempt 1, the whole answer."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inferq.bench.polling import wait_until
from tests.e2e.harness import MODEL, Deployment

pytestmark = pytest.mark.e2e

WORDS = [f"word{n}" for n in range(20)]
PROMPT = " ".join(WORDS)
GRACE_S = "1"


@pytest.fixture
def pair(failed: Any) -> Iterator[Deployment]:
    # One worker, slow enough (0.2 s a word: 4 s an answer) to be mid-generation at SIGTERM.
    with Deployment.running(
        failed,
        replicas=2,
        workers=1,
        echo_delay_s=0.2,
        env_overrides={"INFERQ_DRAIN_GRACE_S": GRACE_S},
    ) as dep:
        yield dep


def call(dep: Deployment, replica: int, key: str, stream: bool) -> httpx.Response:
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}
    headers = {"Authorization": f"Bearer {dep.tokens['client']}", "Idempotency-Key": key}
    with httpx.Client(base_url=dep.replica_url(replica), headers=headers, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
        r.read()
        return r


def streamed_text(r: httpx.Response) -> tuple[str, Any]:
    """The content of an OpenAI stream's chunks, and its last frame."""
    frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(f) for f in frames if f != "[DONE]"]
    text = "".join(
        (c.get("delta") or {}).get("content") or ""
        for chunk in chunks
        if "choices" in chunk
        for c in chunk["choices"]
    )
    last = frames[-1] if frames[-1] == "[DONE]" else json.loads(frames[-1])
    return text, last


def generating(dep: Deployment) -> bool:
    rows = dep.query("SELECT status::text FROM inferq.task")
    return rows == [("claimed",)] or rows == [("running",)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_keyed_call_cut_by_sigterm_reattaches_on_the_other_replica(
    pair: Deployment, stream: bool
) -> None:
    key = f"rolling-{stream}"
    first: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: first.update(r=call(pair, 0, key, stream)))
    thread.start()
    wait_until(lambda: generating(pair), 30, "the worker to be generating")
    code = pair.terminate_replica(0, timeout_s=20)  # SIGTERM, and the drain runs its course
    thread.join(30)
    cut = first["r"]
    again = call(pair, 1, key, stream)

    assert code == 0
    if stream:
        assert cut.status_code == 200  # the stream had started; it ends with an error frame
        text, last = streamed_text(cut)
        assert last["error"]["code"] == "shutting_down" and PROMPT.startswith(text)
        text, last = streamed_text(again)
        assert (text, last) == (PROMPT, "[DONE]")  # from the first chunk: the whole answer
    else:
        assert cut.status_code == 503 and cut.json()["error"]["code"] == "shutting_down"
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == PROMPT
    assert cut.headers["x-inferq-task-id"] == again.headers["x-inferq-task-id"]
    rows = pair.query("SELECT id::text, status::text, attempt FROM inferq.task")
    assert rows == [(again.headers["x-inferq-task-id"], "completed", 1)]  # one generation
