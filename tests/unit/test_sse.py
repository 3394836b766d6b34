"""EventStream: a stream is never cut silently."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message

from inferq.api.sse import EventStream

ERROR = b'data: {"error": {"code": "stream_failed"}}\n\n'


async def run_stream(frames: AsyncIterator[bytes]) -> tuple[bytes, list[str]]:
    """Drive an EventStream as uvicorn would; the body it sent and the hooks it called."""
    called: list[str] = []
    body = bytearray()
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    async def hook(name: str) -> None:
        called.append(name)

    stream = EventStream(
        frames,
        heartbeat_s=60,
        drain=asyncio.Event(),
        drain_frame=b"data: drained\n\n",
        error_frame=ERROR,
        on_disconnect=lambda: hook("disconnect"),
        on_drain=lambda: hook("drain"),
        on_error=lambda: hook("error"),
        on_close=lambda: called.append("close"),
    )
    await stream({"type": "http"}, receive, send)
    return bytes(body), called


async def test_a_stream_whose_source_fails_ends_with_the_error_frame() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("the database went away")

    body, called = await run_stream(failing())
    assert body == b"data: 1\n\n" + ERROR
    assert called == ["error", "close"]


async def test_a_stream_that_ends_sends_its_frames_and_nothing_else() -> None:
    async def frames() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    body, called = await run_stream(frames())
    assert body == b"data: 1\n\ndata: [DONE]\n\n"
    assert called == ["close"]
