"""Backends: echo shapes, and the openai backend in front of the fake upstream server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest

from inferq.wire import WorkerTask
from inferq.worker import ChunkStream, EchoBackend, OpenAIBackend, TaskContext, UpstreamError
from tests import fake_upstream


def make_task(request: dict[str, Any], *, streaming: bool = True) -> WorkerTask:
    return WorkerTask(
        id=uuid4(), attempt=1, pool="p", model="m", streaming=streaming, request=request
    )


class Recorder(ChunkStream):
    def __init__(self) -> None:
        super().__init__(self._never)
        self.chunks: list[Any] = []

    async def _never(self, batch: Any) -> int:
        raise AssertionError("not posted in these tests")

    def emit(self, data: Any) -> int:
        self.chunks.append(data)
        return len(self.chunks)


def run_ctx(task: WorkerTask) -> tuple[TaskContext, Recorder]:
    rec = Recorder()
    return TaskContext(task, rec), rec


def chat_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


CHAT = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "hello big world"},
    ],
}


async def test_echo_streams_the_last_user_message_word_by_word() -> None:
    task = make_task(CHAT)
    ctx, rec = run_ctx(task)
    response = await EchoBackend()(task, ctx)
    assert all(c["object"] == "chat.completion.chunk" for c in rec.chunks)
    assert rec.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat_text(rec.chunks) == "hello big world"
    assert rec.chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "hello big world"}


async def test_echo_answers_a_prompt_with_text_completion_chunks() -> None:
    task = make_task({"model": "m", "prompt": "once upon a time"})
    ctx, rec = run_ctx(task)
    response = await EchoBackend()(task, ctx)
    assert {c["object"] for c in rec.chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in rec.chunks) == "once upon a time"
    assert response["choices"][0]["text"] == "once upon a time"


async def test_echo_emits_nothing_for_a_non_streaming_task() -> None:
    task = make_task(CHAT, streaming=False)
    ctx, rec = run_ctx(task)
    response = await EchoBackend()(task, ctx)
    assert rec.chunks == []
    assert response["choices"][0]["message"]["content"] == "hello big world"


@pytest.fixture
def upstream(request: pytest.FixtureRequest) -> Iterator[str]:
    mode, key = getattr(request, "param", ("ok", None))
    server = fake_upstream.serve_in_thread(mode, api_key=key)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_openai_backend_relays_the_upstream_stream_in_order(upstream: str) -> None:
    backend = OpenAIBackend(upstream)
    task = make_task(CHAT)
    ctx, rec = run_ctx(task)
    try:
        response = await backend(task, ctx)
    finally:
        await backend.aclose()
    assert chat_text(rec.chunks) == fake_upstream.REPLY
    assert len(rec.chunks) == len(fake_upstream.REPLY.split())
    assert response["choices"][0]["message"]["content"] == fake_upstream.REPLY
    assert response["model"] == "m"


async def test_openai_backend_returns_the_upstream_response_verbatim(upstream: str) -> None:
    backend = OpenAIBackend(upstream + "/v1/")
    task = make_task({"model": "m", "prompt": "hi"}, streaming=False)
    ctx, rec = run_ctx(task)
    try:
        response = await backend(task, ctx)
    finally:
        await backend.aclose()
    assert rec.chunks == []
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == fake_upstream.REPLY


@pytest.mark.parametrize("upstream", [("fail", None)], indirect=True)
@pytest.mark.parametrize("streaming", [True, False])
async def test_an_upstream_500_fails_with_the_upstream_message(
    upstream: str, streaming: bool
) -> None:
    backend = OpenAIBackend(upstream)
    task = make_task(CHAT, streaming=streaming)
    try:
        with pytest.raises(UpstreamError) as err:
            await backend(task, run_ctx(task)[0])
    finally:
        await backend.aclose()
    assert str(err.value) == f"upstream returned HTTP 500: {fake_upstream.FAIL_MESSAGE}"


@pytest.mark.parametrize("upstream", [("hang", None)], indirect=True)
async def test_an_upstream_hang_fails_at_the_timeout(upstream: str) -> None:
    backend = OpenAIBackend(upstream, timeout_s=0.3)
    task = make_task(CHAT)
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3s"):
            await backend(task, run_ctx(task)[0])
    finally:
        await backend.aclose()


@pytest.mark.parametrize("upstream", [("ok", "sekrit")], indirect=True)
async def test_the_api_key_is_sent_upstream(upstream: str) -> None:
    task = make_task(CHAT, streaming=False)
    for key, ok in (("sekrit", True), (None, False)):
        backend = OpenAIBackend(upstream, api_key=key)
        try:
            if ok:
                assert (await backend(task, run_ctx(task)[0]))["object"] == "chat.completion"
            else:
                with pytest.raises(UpstreamError, match="HTTP 401: bad api key"):
                    await backend(task, run_ctx(task)[0])
        finally:
            await backend.aclose()
