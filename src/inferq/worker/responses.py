"""Reading aiohttp answers within a size limit: a whole body, or the lines of a stream.

aiohttp parses the framing (a negative or malformed Content-Length or chunk size is refused
there, as are status lines and headers over 8 KiB) and bounds decompression, but
``ClientResponse.read()`` keeps whatever body the server sends. Every HTTP client of the
worker reads through these functions instead, so a server that answers with 512 MiB costs
the worker at most the limit: the body is refused as soon as its declared length, or what
has arrived of it, passes the limit, and the connection is closed unread (aiohttp stops
reading the socket while its small buffer is full, so the rest never enters memory).

Lines are split here rather than with aiohttp's ``readline(max_line_length=)``: that builds
a line by concatenating bytes objects, so a line near the limit held twice the limit in
memory (measured: 17 MiB for an 8 MiB limit) and cost quadratic copying on the way.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import aiohttp


class ResponseTooLargeError(Exception):
    """An answer (or one line of a streamed answer) was larger than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is larger than the limit of {limit} bytes")
        self.limit = limit


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytearray:
    """The whole (decoded) body of ``resp``; ResponseTooLargeError past ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        resp.close()
        raise ResponseTooLargeError(limit)
    body = bytearray()
    async for part in resp.content.iter_any():
        body += part
        if len(body) > limit:
            resp.close()
            raise ResponseTooLargeError(limit)
    return body


async def read_lines(resp: aiohttp.ClientResponse, limit: int) -> AsyncGenerator[bytes, None]:
    """The lines of a streamed body as they arrive (without their newline);
    ResponseTooLargeError when a line is longer than ``limit`` bytes."""
    pending = bytearray()
    async for part in resp.content.iter_any():
        pending += part
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield bytes(pending[start:end])
            start = end + 1
        del pending[:start]
        if len(pending) > limit:
            resp.close()
            raise ResponseTooLargeError(limit)
    if pending:
        yield bytes(pending)
