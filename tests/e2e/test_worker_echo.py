"""`inferq worker --backend echo` against `inferq serve`: the openai client, drain, capacity."""

from __future__ import annotations

import pytest
from openai import OpenAI

from inferq.bench.polling import wait_until
from tests.e2e import audit
from tests.e2e.procs import MODEL, Stack, words

pytestmark = pytest.mark.e2e


def test_the_openai_client_gets_a_streamed_and_a_plain_answer(stack: Stack) -> None:
    worker = stack.worker("--backend", "echo", "--echo-delay", "0.01", capacity=2)
    worker.wait_event("session_bound")
    client = OpenAI(base_url=stack.url + "/v1", api_key=stack.client_token, max_retries=0)

    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello from inferq"}]
    )
    assert plain.choices[0].message.content == "hello from inferq"
    assert plain.choices[0].finish_reason == "stop"
    # The echo backend names the attempt that wrote an answer (EchoBackend's docstring).
    task_hex = plain.id.removeprefix("chatcmpl-")
    assert plain.system_fingerprint == f"fp_echo_{task_hex}_1"

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream me please"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "stream me please"
    assert len(chunks) >= 3  # word by word, not one blob
    assert chunks[-1].choices[0].finish_reason == "stop"
    task_hex = chunks[0].id.removeprefix("chatcmpl-")
    assert {c.system_fingerprint for c in chunks} == {f"fp_echo_{task_hex}_1"}

    completion = client.completions.create(model=MODEL, prompt="once upon a time")
    assert completion.choices[0].text == "once upon a time"
    assert completion.system_fingerprint == f"fp_echo_{completion.id.removeprefix('cmpl-')}_1"
    streamed = client.completions.create(model=MODEL, prompt="tell me more", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "tell me more"

    # The client may read the end of its stream before the worker logs the outcome.
    wait_until(lambda: len(worker.events("task_completed")) == 4, 10, "four outcomes logged")


def test_fifty_tasks_queued_before_any_worker_are_all_done_after_one_binds(
    stack: Stack,
) -> None:
    ids = [stack.submit(f"task {n}")["id"] for n in range(50)]
    worker = stack.worker("--backend", "echo", capacity=4)
    bound = worker.wait_event("session_bound")
    assert bound["drained"] == 4  # the bind itself handed out work, up to capacity

    def done() -> bool:
        rows = stack.query(
            "SELECT count(*) FROM inferq.task WHERE id = ANY(%s) AND status = 'completed'", (ids,)
        )
        return int(rows[0][0]) == 50

    wait_until(done, 60, "all 50 tasks to complete")
    assert stack.task(ids[0])["response"]["choices"][0]["message"]["content"] == "task 0"
    assert stack.task(ids[-1])["response"]["choices"][0]["message"]["content"] == "task 49"


def test_a_worker_with_capacity_two_never_holds_more_than_two_tasks(stack: Stack) -> None:
    ids = [stack.submit(words(5))["id"] for _ in range(8)]
    stack.worker("--backend", "echo", "--echo-delay", "0.05", capacity=2)

    def all_done() -> bool:
        done = stack.query(
            "SELECT count(*) FROM inferq.task WHERE id = ANY(%s) AND status = 'completed'", (ids,)
        )
        return int(done[0][0]) == len(ids)

    wait_until(all_done, 60, "all tasks to complete")
    # Exactly, not by sampling: from the audit in commit order, the most tasks each session
    # held at once (claimed or running).
    peaks = audit.most_held(audit.read(stack.dsn))
    assert peaks, "no worker session held anything"
    assert max(peaks.values()) == 2, peaks
