"""AsyncioTransport: an httpx transport speaking HTTP/1.1 over asyncio protocols.

The worker's requests are small JSON bodies answered by small JSON bodies, many per task. With
httpx's default transport (httpcore over anyio, h11) a request cost ~650 us of CPU on a small
machine, most of it below httpx itself: anyio stream wrappers and cancel scopes, h11's event
machinery, and a readability probe (a select() call) of every pooled connection before each
request. This transport keeps httpx's client API, retries and error classes and does the wire
work directly: an asyncio Protocol per connection that parses the answer as bytes arrive.

What it supports: HTTP/1.1 keep-alive with a bounded pool per origin; TLS with httpx's own SSL
context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR); ``Content-Length``, chunked and
close-delimited answers; ``Connection: close``; httpx's connect and pool timeouts, and its read
timeout as one deadline for the whole answer (answers are small). What it does not: HTTP/2,
proxies (WorkerClient keeps httpx's own transport when one is configured), response streaming
(the whole body is read before returning), 1xx answers other than skipping them: nothing the
worker API needs. Errors are httpx's: ConnectError, ConnectTimeout, ReadTimeout, WriteError,
RemoteProtocolError, PoolTimeout, so the client's retry logic sees what it knows.
A connection whose request was interrupted (cancelled, timed out) is closed, never reused; a
pooled connection the server closed is noticed by connection_lost and dropped before reuse.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import cast

import httpx

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_HEAD_BYTES = 64 * 1024


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one request at a time (``exchange``). The transport
    below pools them; the bench's load generator drives them directly."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None

    # -- protocol callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self.closed = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- request ------------------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _more(self) -> None:
        """Wait for more bytes; raises when the connection ended first."""
        if self._eof:
            raise httpx.RemoteProtocolError(
                "the server closed the connection in the middle of an answer"
                if self._buffer
                else "the server closed the connection without sending an answer"
            )
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _read_until(self, marker: bytes) -> bytes:
        start = 0
        while True:
            at = self._buffer.find(marker, start)
            if at >= 0:
                found = bytes(self._buffer[:at])
                del self._buffer[: at + len(marker)]
                return found
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("an answer line or head is too long")
            start = max(0, len(self._buffer) - len(marker) + 1)
            await self._more()

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._more()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def _read_to_end(self) -> bytes:
        while not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def exchange(
        self, head: bytes, body: bytes, method: bytes
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bool]:
        """Send one request; (status, reason, headers, body, reusable) of its answer."""
        assert self.transport is not None
        if self._buffer or self.closed:
            raise httpx.RemoteProtocolError("the connection is not idle")
        try:
            self.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                self.transport.write(body)
        except (OSError, RuntimeError) as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        while True:
            status, reason, headers = self._parse_head(await self._read_until(b"\r\n\r\n"))
            if not 100 <= status < 200 or status == 101:
                break  # interim answers (100 Continue, 103 Early Hints) are skipped
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            lowered = name.lower()
            fields[lowered] = fields[lowered] + b"," + value if lowered in fields else value
        reusable = b"close" not in fields.get(b"connection", b"").lower()
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            content = b""
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            content = await self._read_chunked()
        elif b"content-length" in fields:
            try:
                length = int(fields[b"content-length"].split(b",")[0])
            except ValueError:
                raise httpx.RemoteProtocolError("an invalid Content-Length") from None
            content = await self._read_exactly(length)
        else:
            content = await self._read_to_end()
            reusable = False
        return status, reason, headers, content, reusable and not self.closed

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = await self._read_until(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError("an invalid chunk size") from None
            if size == 0:
                while await self._read_until(b"\r\n"):
                    pass  # trailers, up to the empty line
                return b"".join(parts)
            parts.append(await self._read_exactly(size))
            await self._read_exactly(2)

    @staticmethod
    def _parse_head(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 answer: {lines[0][:100]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise httpx.RemoteProtocolError(f"an invalid status line: {lines[0][:100]!r}") from None
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError(f"an invalid header line: {line[:100]!r}")
            headers.append((name.strip(), value.strip()))
        return status, parts[2] if len(parts) > 2 else b"", headers


class AsyncioTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio with at most ``max_connections`` connections per origin."""

    def __init__(
        self,
        *,
        max_connections: int = 16,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.max_connections = max_connections
        if isinstance(verify, ssl.SSLContext):
            self._ssl: ssl.SSLContext | None = verify
        else:
            self._ssl = None
            self._verify = verify
        self._idle: dict[tuple[str, str, int], deque[Connection]] = {}
        self._open: dict[tuple[str, str, int], int] = {}
        # Requests waiting for a slot, per origin.
        self._waiting: dict[tuple[str, str, int], deque[asyncio.Future[None]]] = {}
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # httpx's own: certifi, or SSL_CERT_FILE / SSL_CERT_DIR when set.
            self._ssl = httpx.create_ssl_context(verify=self._verify)
        return self._ssl

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        target = url.raw_path
        lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        head = b"".join(lines)
        conn = await self._acquire(origin, timeouts)
        reusable = False
        try:
            # One deadline for the whole answer (httpx's is per read): answers are small.
            async with asyncio.timeout(timeouts.get("read")):
                status, reason, headers, content, reusable = await conn.exchange(
                    head, body, request.method.encode()
                )
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the answer") from None
        finally:
            self._release(origin, conn, reusable)
        return httpx.Response(
            status,
            headers=headers,
            content=content,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def _acquire(
        self, origin: tuple[str, str, int], timeouts: dict[str, float | None]
    ) -> Connection:
        if self._closed:
            raise RuntimeError("the transport is closed")
        idle = self._idle.setdefault(origin, deque())
        while True:
            while idle:
                conn = idle.pop()  # the most recently used is the least likely to be stale
                if not conn.closed:
                    return conn
                self._open[origin] -= 1
            if self._open.get(origin, 0) < self.max_connections:
                break
            freed = asyncio.get_running_loop().create_future()
            waiting = self._waiting.setdefault(origin, deque())
            waiting.append(freed)
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await freed
            except BaseException as exc:
                # Woken, but leaving anyway (cancelled, or its timeout fired in the same tick):
                # the slot it was woken for goes to the next waiter, not to nobody.
                if freed.done() and not freed.cancelled():
                    self._wake_one(origin)
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no free connection in time") from None
                raise
            finally:
                if freed in waiting:
                    waiting.remove(freed)
        self._open[origin] = self._open.get(origin, 0) + 1
        try:
            return await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._open[origin] -= 1
            self._wake_one(origin)
            raise

    async def _connect(self, origin: tuple[str, str, int], connect_s: float | None) -> Connection:
        scheme, host, port = origin
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        loop = asyncio.get_running_loop()
        tls = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(
                    Connection, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connecting to {host}:{port}: {exc}") from exc
        return conn

    def _release(self, origin: tuple[str, str, int], conn: Connection, reusable: bool) -> None:
        if reusable and not conn.closed and not self._closed:
            self._idle[origin].append(conn)
        else:
            conn.close()
            self._open[origin] -= 1
        self._wake_one(origin)

    def _wake_one(self, origin: tuple[str, str, int]) -> None:
        waiting = self._waiting.get(origin)
        while waiting:
            freed = waiting.popleft()
            if not freed.done():
                freed.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
