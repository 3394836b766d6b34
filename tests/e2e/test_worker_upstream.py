"""The openai backend in front of tests/fake_upstream.py (a separate process)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests import fake_upstream
from tests.e2e.procs import MODEL, Stack

pytestmark = pytest.mark.e2e

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say something"}]


def client_for(stack: Stack) -> OpenAI:
    return OpenAI(base_url=stack.url + "/v1", api_key=stack.client_token, max_retries=0)


def test_streamed_chunks_arrive_in_order_and_plain_answers_verbatim(stack: Stack) -> None:
    upstream = stack.upstream("ok", delay_s=0.02)
    stack.worker("--backend", upstream, capacity=2).wait_event("session_bound")
    client = client_for(stack)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks]
    assert pieces == [w if i == 0 else " " + w for i, w in enumerate(fake_upstream.REPLY.split())]

    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert plain.choices[0].message.content == fake_upstream.REPLY
    assert plain.usage is not None and plain.usage.total_tokens == 10  # the upstream's own


def test_an_upstream_500_fails_the_task_with_the_upstream_message(stack: Stack) -> None:
    upstream = stack.upstream("fail")
    worker = stack.worker("--backend", upstream)
    task = stack.submit("anything")
    done = stack.wait_task(task["id"])
    assert done["status"] == "error"
    assert done["error"] == f"upstream returned HTTP 500: {fake_upstream.FAIL_MESSAGE}"
    worker.wait_event("task_failed", task_id=task["id"])

    with pytest.raises(openai.APIStatusError) as err:
        client_for(stack).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert err.value.status_code == 502
    assert fake_upstream.FAIL_MESSAGE in str(err.value)


def test_an_upstream_hang_fails_the_task_at_the_backend_timeout(stack: Stack) -> None:
    upstream = stack.upstream("hang")
    stack.worker("--backend", upstream, "--backend-timeout", "1")
    task = stack.submit("anything", streaming=True)
    done = stack.wait_task(task["id"])
    assert done["status"] == "error"
    assert done["error"] == "the upstream server did not answer within 1s"  # no URL
