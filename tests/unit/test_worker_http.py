"""AsyncioTransport against a scripted local HTTP server: framing, keep-alive, errors."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trustme

from inferq.worker._http import AsyncioTransport

Answer = Callable[[bytes], bytes]


class Server:
    """Answers each request with ``answer(request head)``; counts connections."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                reply = self.answer(head)
                if not reply:
                    continue  # never answer: the client times out
                writer.write(reply)
                await writer.drain()
                lowered = reply.lower()
                framed = b"content-length" in lowered or b"transfer-encoding" in lowered
                if b"connection: close" in lowered or not framed:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


Serve = Callable[[Answer], Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start scripted servers on free loopback ports; all stopped at the end."""
    listeners: list[asyncio.Server] = []
    made: list[Server] = []

    async def start(answer: Answer) -> Server:
        server = Server(answer)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        listeners.append(listener)
        made.append(server)
        return server

    yield start
    for listener in listeners:
        listener.close()
    for server in made:
        for w in server.writers:
            w.close()


def fixed(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def test_keep_alive_reuses_one_connection(serve: Serve) -> None:
    server = await serve(lambda head: fixed(b'{"ok": true}', "Content-Type: application/json"))
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        for _ in range(5):
            r = await http.post(server.url + "/x?q=1", content=b'{"a": 1}')
            assert r.status_code == 200 and r.json() == {"ok": True}
    assert server.connections == 1


async def test_chunked_and_close_delimited_answers(serve: Serve) -> None:
    chunked = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    server = await serve(lambda head: chunked)
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        r = await http.get(server.url)
        assert (r.status_code, r.text) == (201, "hello, world")
        again = await http.get(server.url)
        assert again.text == "hello, world"
    assert server.connections == 1
    closing = await serve(lambda head: b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        assert (await http.get(closing.url)).text == "until the end"
        assert (await http.get(closing.url)).text == "until the end"
    assert closing.connections == 2  # a close-delimited answer ends its connection


async def test_connection_close_and_a_server_closing_idle_connections(serve: Serve) -> None:
    server = await serve(lambda head: fixed(b"bye", "Connection: close"))
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        assert (await http.get(server.url)).text == "bye"
        assert (await http.get(server.url)).text == "bye"
    assert server.connections == 2
    idle = await serve(lambda head: fixed(b"hi"))
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        assert (await http.get(idle.url)).text == "hi"
        for w in idle.writers:
            w.close()  # the server drops the idle keep-alive connection
        await asyncio.sleep(0.05)  # let the client's protocol see the close
        assert (await http.get(idle.url)).text == "hi"
    assert idle.connections == 2


async def test_gzip_answers_are_decoded_by_httpx(serve: Serve) -> None:
    packed = gzip.compress(b'{"big": "answer"}')
    server = await serve(lambda head: fixed(packed, "Content-Encoding: gzip"))
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        assert (await http.get(server.url)).json() == {"big": "answer"}


async def test_the_pool_limit_queues_requests(serve: Serve) -> None:
    server = await serve(lambda head: fixed(head.split(b" ")[1]))
    async with httpx.AsyncClient(transport=AsyncioTransport(max_connections=2)) as http:
        answers = await asyncio.gather(*(http.get(f"{server.url}/{i}") for i in range(10)))
    assert [a.text for a in answers] == [f"/{i}" for i in range(10)]
    assert server.connections <= 2


async def test_a_slot_woken_for_a_request_that_left_goes_to_the_next(serve: Serve) -> None:
    """A request woken for a free connection but cancelled before it ran (a chunk post of a
    cancelled task) must pass the slot on; the next request used to sit out its pool timeout."""
    server = await serve(lambda head: fixed(b"ok"))
    transport = AsyncioTransport(max_connections=1)
    origin = ("http", "127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    held = await transport._acquire(origin, {})
    woken = asyncio.create_task(transport._acquire(origin, {}))
    after = asyncio.create_task(transport._acquire(origin, {"pool": 5.0}))
    await asyncio.sleep(0.01)  # both are waiting for the one connection
    transport._release(origin, held, True)  # wakes the first ...
    woken.cancel()  # ... which leaves before it runs
    async with asyncio.timeout(1.0):
        assert await after is held
    assert woken.cancelled()
    await transport.aclose()


async def test_errors_are_httpx_transport_errors(serve: Serve) -> None:
    silent = await serve(lambda head: b"")
    garbage = await serve(lambda head: b"SPDY/3 what\r\n\r\n")
    async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(silent.url, timeout=httpx.Timeout(5, read=0.1))
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(garbage.url)
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")
        # After a timeout the connection is not reused for the next request.
        silent.answer = lambda head: fixed(b"late but fine")
        assert (await http.get(silent.url)).text == "late but fine"
    assert silent.connections == 2


@pytest.fixture
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for localhost, and a client context that trusts the
    throwaway authority that signed it (trustme: no openssl command needed)."""
    authority = trustme.CA()
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost").configure_cert(server_tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    return server_tls, trusting


async def test_https_with_a_verified_certificate(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, trusting = tls
    server = Server(lambda head: fixed(b"over tls"))
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_tls)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=AsyncioTransport(verify=trusting)) as http:
            assert (await http.get(f"https://localhost:{port}/")).text == "over tls"
            assert (await http.get(f"https://localhost:{port}/")).text == "over tls"
        assert server.connections == 1
        # The default verification refuses a certificate nobody vouches for.
        async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"https://localhost:{port}/")
    finally:
        listener.close()
        for w in server.writers:
            w.close()


def test_a_configured_proxy_keeps_httpx_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferq.worker.client import _default_transport

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert isinstance(_default_transport("https://inferq.example"), AsyncioTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _default_transport("https://inferq.example") is None  # httpx's, with the proxy
    assert isinstance(_default_transport("http://inferq.example"), AsyncioTransport)
    monkeypatch.setenv("NO_PROXY", "inferq.example")
    assert isinstance(_default_transport("https://inferq.example"), AsyncioTransport)
