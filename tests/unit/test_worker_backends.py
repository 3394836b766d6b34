"""Backends: echo shapes, and the openai backend in front of the fake upstream server and of
scripted raw servers (the failures it must tell apart)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest

from inferq.db.cluster import free_port
from inferq.wire import WorkerTask
from inferq.worker import (
    BackendUnavailableError,
    ChunkStream,
    EchoBackend,
    OpenAIBackend,
    TaskContext,
    UpstreamError,
)
from tests import fake_upstream
from tests.unit.raw_http import Serve, fixed


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


@pytest.mark.parametrize("client_asked", [False, True])
async def test_openai_backend_asks_a_streaming_upstream_for_usage(
    upstream: str, client_asked: bool
) -> None:
    # The stored answer carries the upstream's usage (inferq's accounting counts it); the
    # client sees the usage chunk only when its own request asked for it.
    backend = OpenAIBackend(upstream)
    request = {**CHAT, "stream_options": {"include_usage": True}} if client_asked else CHAT
    task = make_task(request)
    ctx, rec = run_ctx(task)
    try:
        response = await backend(task, ctx)
    finally:
        await backend.aclose()
    assert response["usage"] == fake_upstream.USAGE
    assert chat_text([c for c in rec.chunks if c["choices"]]) == fake_upstream.REPLY
    usage_chunks = [c for c in rec.chunks if not c["choices"]]
    assert [c["usage"] for c in usage_chunks] == ([fake_upstream.USAGE] if client_asked else [])


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


# -- failures the worker must sort: down (release the task) or failed (fail it) ---------------


async def call(backend: OpenAIBackend, streaming: bool = True) -> Any:
    task = make_task(CHAT, streaming=streaming)
    try:
        return await backend(task, run_ctx(task)[0])
    finally:
        await backend.aclose()


async def test_a_refused_connection_is_backend_unavailable_without_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(BackendUnavailableError) as err:
        await call(OpenAIBackend(url, api_key="sekrit"))
    assert "127.0.0.1" not in str(err.value) and "sekrit" not in str(err.value)
    backend = OpenAIBackend(url)
    try:
        assert not await backend.check()
    finally:
        await backend.aclose()


async def test_a_stream_cut_mid_answer_is_backend_unavailable(
    serve: Serve,
) -> None:
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (
        len(event),
        event,
    )
    server = await serve(lambda head: cut)
    server.close_after_answer = True
    with pytest.raises(BackendUnavailableError):
        await call(OpenAIBackend(server.url))


@pytest.mark.parametrize("upstream", [("hang", None)], indirect=True)
async def test_a_hang_is_a_failure_while_the_health_check_passes(upstream: str) -> None:
    backend = OpenAIBackend(upstream, timeout_s=0.3)
    with pytest.raises(UpstreamError, match=r"^the upstream server did not answer within 0\.3s$"):
        await call(backend)


async def test_a_hang_is_backend_unavailable_when_the_health_check_fails(
    serve: Serve,
) -> None:
    server = await serve(lambda head: b"")  # reads the request, never answers anything
    backend = OpenAIBackend(server.url, timeout_s=0.3)
    backend.check_timeout_s = 0.3
    with pytest.raises(BackendUnavailableError):
        await call(backend)


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_4xx_fails_with_the_upstream_message_and_no_url(
    serve: Serve, streaming: bool
) -> None:
    body = b'{"error": {"message": "max_tokens is too large", "type": "invalid_request"}}'
    server = await serve(lambda head: fixed(body, "400 Bad Request"))
    with pytest.raises(UpstreamError) as err:
        await call(OpenAIBackend(server.url, api_key="sekrit"), streaming)
    assert str(err.value) == "upstream returned HTTP 400: max_tokens is too large"


async def test_an_answer_over_the_limit_fails_the_task(
    serve: Serve,
) -> None:
    server = await serve(lambda head: fixed(b'{"pad": "' + b"x" * 300_000 + b'"}'))
    with pytest.raises(UpstreamError, match="answer larger than the limit of 100000 bytes"):
        await call(OpenAIBackend(server.url, max_response_bytes=100_000), streaming=False)


async def test_a_stream_line_over_the_limit_fails_the_task(
    serve: Serve,
) -> None:
    line = b"data: " + b"x" * 300_000 + b"\n\n"
    server = await serve(
        lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line)
    )
    with pytest.raises(UpstreamError, match="event line of its stream larger than the limit"):
        await call(OpenAIBackend(server.url, max_line_bytes=100_000))


async def test_malformed_framing_fails_the_task(
    serve: Serve,
) -> None:
    server = await serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello")
    with pytest.raises(UpstreamError, match=r"malformed answer \(ClientResponseError\)"):
        await call(OpenAIBackend(server.url), streaming=False)
