"""The official openai client against a running replica, answered by a worker over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    EchoWorker,
    Server,
    Tokens,
    count_rows,
    make_tokens,
    running_worker,
    serve_app,
)

pytestmark = pytest.mark.db


_clients: list[openai.AsyncOpenAI] = []


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    fast = settings.model_copy(update={"sse_heartbeat_s": 0.2, "safety_poll_s": 1.0})
    tokens = await make_tokens(fast, dsn)
    async with serve_app(fast, dsn) as server:
        yield server, tokens
        while _clients:
            await _clients.pop().close()


def client(server: Server, secret: str) -> openai.AsyncOpenAI:
    made = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0)
    _clients.append(made)
    return made


async def test_chat_completion_sync(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with running_worker(EchoWorker(server.url, tokens.worker)):
        answer = await client(server, tokens.alice).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello world"}]
        )
    assert answer.choices[0].message.content == "echo: hello world"
    assert answer.object == "chat.completion"


async def test_chat_completion_stream_survives_idle_gap(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    # The worker pauses 3 heartbeat intervals before its last chunk: the client must see the
    # ": ping" comments as nothing at all.
    worker = EchoWorker(server.url, tokens.worker, gap_s=0.6)
    async with running_worker(worker):
        stream = await client(server, tokens.alice).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
        )
        pieces: list[Any] = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert text == "echo: one two three"
    assert pieces[-1].choices[0].finish_reason == "stop"


async def test_stream_has_no_id_or_retry_lines(app: tuple[Server, Tokens]) -> None:
    import httpx

    server, tokens = app
    async with (
        running_worker(EchoWorker(server.url, tokens.worker, gap_s=0.5)),
        httpx.AsyncClient(base_url=server.url) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {tokens.alice}"},
            json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "a b"}]},
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-inferq-task-id"]
        body = (await r.aread()).decode()
    lines = [line for line in body.split("\n") if line]
    assert not [line for line in lines if line.startswith(("id:", "retry:", "event:"))]
    assert ": ping" in lines  # the heartbeat during the gap
    assert lines[-1] == "data: [DONE]"


async def test_completions_endpoint(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with running_worker(EchoWorker(server.url, tokens.worker)):
        answer = await client(server, tokens.alice).completions.with_raw_response.create(
            model=MODEL, prompt="say hi"
        )
    assert answer.headers["x-inferq-task-id"]
    assert "echo: say hi" in str(answer.parse())


async def test_unknown_model_is_not_found(app: tuple[Server, Tokens], dsn: str) -> None:
    server, tokens = app
    with pytest.raises(openai.NotFoundError) as caught:
        await client(server, tokens.alice).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == "model_not_found"
    assert count_rows(dsn) == 0


async def test_worker_failure_is_api_error_with_its_message(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with running_worker(EchoWorker(server.url, tokens.worker)):
        # Sync: 502 server_error task_failed, which the SDK raises as InternalServerError.
        with pytest.raises(openai.APIError) as caught:
            await client(server, tokens.alice).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "FAIL: CUDA out of memory"}]
            )
        # Streaming: the 200 stream ends with an error frame, which the SDK raises as a plain
        # APIError (no status: the response had already begun).
        with pytest.raises(openai.APIError) as streamed:
            stream = await client(server, tokens.alice).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "FAIL: backend exploded"}],
                stream=True,
            )
            async for _ in stream:
                pass
    sync_error = caught.value
    assert type(sync_error) is openai.InternalServerError
    assert sync_error.status_code == 502
    assert (sync_error.type, sync_error.code) == ("server_error", "task_failed")
    assert "CUDA out of memory" in sync_error.message
    stream_error = streamed.value
    assert type(stream_error) is openai.APIError
    assert (stream_error.type, stream_error.code) == ("server_error", "task_failed")
    assert stream_error.message == "backend exploded"


async def test_models_lists_the_registry(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    models = await client(server, tokens.alice).models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_bad_token_is_authentication_error(app: tuple[Server, Tokens]) -> None:
    server, _ = app
    with pytest.raises(openai.AuthenticationError):
        await client(server, "iq_wrong").models.list()
