"""Scripted raw HTTP servers for the worker client's and backends' tests: each answers a
request with whatever bytes the test scripts (bad framing, cut answers, silence), which no
well-behaved server library would send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

Answer = Callable[[bytes], bytes]
Serve = Callable[[Answer], Awaitable["Server"]]


class Server:
    """Answers each request with ``answer(request head)`` (raw bytes); counts connections."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.close_after_answer = False
        self.connections = 0
        self.requests = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                self.requests += 1
                writer.write(self.answer(head))
                await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start scripted servers on loopback ports; all are closed after the test."""
    listeners: list[asyncio.Server] = []

    async def start(answer: Answer) -> Server:
        server = Server(answer)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        listeners.append(listener)
        return server

    yield start
    for listener in listeners:
        listener.close()


def fixed(body: bytes, status: str = "200 OK") -> bytes:
    """A complete HTTP/1.1 answer with ``body`` and its Content-Length."""
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
