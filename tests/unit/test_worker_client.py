"""WorkerClient over aiohttp against scripted raw HTTP servers: limits, framing, retries."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from inferq.worker import UnavailableError, WorkerApiError, WorkerClient
from inferq.worker.client import proxy_for
from tests.unit.raw_http import Serve, fixed

OK = b'{"released": 0}'


async def test_calls_share_one_keep_alive_connection(serve: Serve) -> None:
    server = await serve(lambda head: fixed(OK))
    async with WorkerClient(server.url, "t") as client:
        for _ in range(5):
            assert await client.unbind(uuid4()) == 0
    assert (server.connections, server.requests) == (1, 5)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_answer_over_the_limit_is_refused_and_not_retried(
    serve: Serve, framing: str
) -> None:
    big = b'{"released": 0, "pad": "' + b"x" * 200_000 + b'"}'
    if framing == "chunked":
        pieces = [big[i : i + 8192] for i in range(0, len(big), 8192)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    else:
        answer = fixed(big)
    server = await serve(lambda head: answer)
    async with WorkerClient(server.url, "t", max_response_bytes=100_000) as client:
        with pytest.raises(WorkerApiError, match="larger than the limit of 100000 bytes"):
            await client.unbind(uuid4())
        client.max_response_bytes = 300_000
        assert await client.unbind(uuid4()) == 0  # the same answer, under a larger limit
    assert server.requests == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"SPDY/3 what\r\n\r\n",
    ],
    ids=["negative-content-length", "negative-chunk-size", "not-http"],
)
async def test_malformed_framing_is_refused(serve: Serve, answer: bytes) -> None:
    server = await serve(lambda head: answer)
    async with WorkerClient(server.url, "t", retry_budget_s=0.05, backoff_max_s=0.001) as client:
        with pytest.raises(UnavailableError, match="ClientResponseError"):
            await client.unbind(uuid4())


async def test_a_503_is_retried_until_an_answer(serve: Serve) -> None:
    answers = [fixed(b"{}", "503 Service Unavailable")] * 3 + [fixed(OK)]
    server = await serve(lambda head: answers.pop(0))
    async with WorkerClient(server.url, "t", backoff_max_s=0.001) as client:
        assert await client.unbind(uuid4()) == 0
    assert server.requests == 4


async def test_the_shutdown_deadline_ends_a_call_and_its_retries(serve: Serve) -> None:
    server = await serve(lambda head: fixed(b"{}", "503 Service Unavailable"))
    async with WorkerClient(server.url, "t", backoff_max_s=0.01) as client:
        client.deadline = asyncio.get_running_loop().time() + 0.2
        async with asyncio.timeout(10):  # a backstop; the retry budget alone is 120 s
            with pytest.raises(UnavailableError, match="shutdown deadline passed"):
                await client.unbind(uuid4())
    assert server.requests > 1


def test_a_proxy_from_the_environment_is_looked_up_once_per_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert proxy_for("https://inferq.example") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert proxy_for("https://inferq.example") == "http://proxy.example:3128"
    assert proxy_for("http://inferq.example") is None
    monkeypatch.setenv("NO_PROXY", "inferq.example")
    assert proxy_for("https://inferq.example") is None
