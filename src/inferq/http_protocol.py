"""BoundedHttpToolsProtocol: uvicorn's httptools protocol with every request head bounded in
size and time, and the connections of a replica bounded in number, before any application
code runs.

uvicorn's httptools protocol has no cap on a request head: httptools keeps an unfinished
header value as a growing ``bytes`` (``+=`` per read) and uvicorn appends the URL the same
way, so eight unauthenticated connections each sending an unfinished 300 MiB header took a
replica from 69 MB to 2.4 GB. It has no header or body read timeout either (a connection that
trickles one byte every few seconds stays open for ever), and ``limit_concurrency`` only
answers 503 to *requests* past the limit: it accepts and keeps every connection, and every
unfinished head on them.

Why httptools with this subclass rather than uvicorn's h11 protocol, which has
``h11_max_incomplete_event_size``: measured on this 2-core machine (uvloop, one replica
process on PostgreSQL, 4 keep-alive connections sending ``GET /healthz`` of the inferq app
back to back, server CPU from /proc; median of 3 runs of 20,000 requests each, machine load
3-4 from other work, so read the CPU column):

    httptools (uvicorn's own)        6,225 req/s   114 us CPU per request
    httptools + the bounds below     6,008 req/s   119 us CPU per request
    h11 (max incomplete 64 KiB)      3,075 req/s   210 us CPU per request

h11 costs ~95 us more CPU per request, about as much as the whole of a hot route's HTTP
handling, and would still need a subclass: it answers an oversized head with 400, not 431,
lets a head over the limit through when it arrives complete in one read, and has no header
or body timeout either. The bounds cost a few microseconds per request, within the noise,
and ~100 bytes per open connection (`inferq bench --only memory`: 10,770 -> 10,873 B per
parked request on the bare app, 17,563 -> 17,684 B per open wait on a replica). Under the
attack above, a replica's RSS now moves by under 1 MiB (tests/e2e/test_serve_hardening.py).

What it adds to uvicorn's HttpToolsProtocol:

- **head size**: the bytes received while a request head is incomplete are counted; past
  ``max_head_bytes`` the connection is answered 431 and closed, so an unfinished head holds
  at most the limit plus one read (uvloop reads at most 256 KiB at a time). A head that
  arrives complete in one read is measured when it completes (URL and headers) and refused
  the same way. The application never sees either request.
- **head timeout**: a connection must deliver a complete head within ``head_timeout_s`` of
  opening, and a keep-alive connection within ``head_timeout_s`` of the first byte of its
  next request; else it is closed (408 when part of a head had arrived). Idle keep-alive
  connections are uvicorn's own ``timeout_keep_alive``.
- **body timeout**: while the server waits for a request body, ``body_timeout_s`` without a
  byte closes the connection (408 when no response has started). Time during which uvicorn
  stopped reading because the application has not consumed the body yet does not count.
- **connections**: past ``max_connections`` open connections, a new one is answered 503 and
  closed at once, before anything it sends is parsed; uvicorn's ``limit_concurrency`` would
  accept and keep it (see above), so it is not used.

A refused connection gets its answer, then a lingering close (LINGER_S). The timers are armed
only when a head or a body straddles reads (and once per new connection), so a request that
arrives in one read, nearly all of them, costs two integer updates and no timer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

# After a refusal the connection is half-closed (the answer and a FIN go out) and what the
# client still sends is read and dropped for this long: closing with unread data would send
# a RST, which makes the client's kernel drop our answer before the client reads it.
LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The bounds of one server (INFERQ_MAX_HEADER_BYTES, INFERQ_HEADER_TIMEOUT_S,
    INFERQ_BODY_TIMEOUT_S, INFERQ_MAX_CONNECTIONS)."""

    max_head_bytes: int = 64 * 1024
    head_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_connections: int = 4096

    @classmethod
    def from_settings(cls, settings: Any) -> HttpLimits:
        return cls(
            max_head_bytes=settings.max_header_bytes,
            head_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


class _HeadTooLarge(Exception):
    """Raised from a parser callback; httptools re-raises it as the context of its error."""


def _error(status: int, message: str, code: str) -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "service_unavailable" if status == 503 else "invalid_request_error",
                "code": code,
                "param": None,
            }
        }
    )
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class _Bounds:
    """The per-connection state of the bounds, in one slotted object: uvicorn's protocol has
    28 instance attributes, and eight more would push its ``__dict__`` past CPython's
    key-sharing limit (30), from 296 to 1,584 bytes per open connection."""

    __slots__ = (
        "body_bytes",
        "body_mark",
        "body_timer",
        "discarding",
        "head_bytes",
        "head_timer",
        "head_too_large",
        "in_head",
    )

    def __init__(self) -> None:
        self.in_head = True  # the next bytes belong to a request head
        self.head_bytes = 0  # received since that head began
        self.head_too_large = False
        self.discarding = False  # refused: read and drop until the lingering close
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_bytes = 0
        self.body_mark = 0
        self.body_timer: asyncio.TimerHandle | None = None


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with the bounds of the module docstring; build a configured class
    with ``BoundedHttpToolsProtocol.with_limits(limits)``."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
        """A subclass bound to ``limits`` (uvicorn builds protocols from a class)."""
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._bounds = _Bounds()

    # -- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        if len(self.connections) > limits.max_connections:
            self._refuse(
                503,
                f"this replica has {limits.max_connections} open connections "
                "(INFERQ_MAX_CONNECTIONS); retry",
                "too_many_connections",
            )
            return
        self._bounds.head_timer = self.loop.call_later(limits.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        b = self._bounds
        if b.discarding:
            return
        if b.in_head:
            b.head_bytes += len(data)
        else:
            b.body_bytes += len(data)
        super().data_received(data)
        if b.in_head:
            if b.head_bytes:
                self._head_pending()
        elif b.body_timer is None:
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                b.body_mark = b.body_bytes
                b.body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_check)

    def send_400_response(self, msg: str) -> None:
        if self._bounds.head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    # -- parser callbacks -------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        b = self._bounds
        b.in_head = False
        if b.head_timer is not None:
            b.head_timer.cancel()
            b.head_timer = None
        limit = self.limits.max_head_bytes
        if b.head_bytes > limit and self._head_size() > limit:
            # The head arrived whole in one read: refuse it before uvicorn builds a request.
            b.head_too_large = True
            raise _HeadTooLarge()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        b = self._bounds
        b.in_head = True
        b.head_bytes = 0
        if b.body_timer is not None:
            b.body_timer.cancel()
            b.body_timer = None

    # -- the bounds -------------------------------------------------------------------------

    def _head_size(self) -> int:
        # What the head holds once parsed: the URL, and each header with its ": " and CRLF.
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _head_pending(self) -> None:
        """Part of a head has arrived: refuse it past the limit, else time it."""
        b = self._bounds
        if b.discarding or self.transport.is_closing():
            return  # already answered (uvicorn's 400 for a malformed head, or ours)
        if b.head_bytes > self.limits.max_head_bytes:
            self._refuse_head()
        elif b.head_timer is None:
            b.head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _refuse_head(self) -> None:
        limit = self.limits.max_head_bytes
        self._refuse(
            431,
            f"the request head (request line and headers) is larger than {limit} bytes "
            "(INFERQ_MAX_HEADER_BYTES)",
            "header_too_large",
        )

    def _head_timed_out(self) -> None:
        b = self._bounds
        b.head_timer = None
        if b.discarding or self.transport.is_closing() or not b.in_head:
            return
        if b.head_bytes:
            self._refuse(
                408,
                f"the request head did not arrive within {self.limits.head_timeout_s:g} s "
                "(INFERQ_HEADER_TIMEOUT_S)",
                "request_timeout",
            )
        else:
            self.transport.close()

    def _body_check(self) -> None:
        b = self._bounds
        b.body_timer = None
        cycle = self.cycle
        if (
            b.discarding
            or self.transport.is_closing()
            or cycle is None
            or not cycle.more_body
            or cycle.response_complete
        ):
            return
        if b.body_bytes != b.body_mark or self.flow.read_paused:
            # Progress, or uvicorn stopped reading until the app consumes what it has.
            b.body_mark = b.body_bytes
            b.body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_check)
            return
        if cycle.response_started:
            self.transport.close()
            return
        self._refuse(
            408,
            f"no byte of the request body arrived for {self.limits.body_timeout_s:g} s "
            "(INFERQ_BODY_TIMEOUT_S)",
            "request_timeout",
        )

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` with the error JSON and close the connection (lingering: see
        LINGER_S)."""
        self._cancel_timers()
        self._bounds.discarding = True
        transport = self.transport
        transport.write(_error(status, message, code))
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _cancel_timers(self) -> None:
        b = self._bounds
        for timer in (b.head_timer, b.body_timer):
            if timer is not None:
                timer.cancel()
        b.head_timer = b.body_timer = None
