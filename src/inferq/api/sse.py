"""Server-sent event streams: the native event format, the OpenAI format, heartbeats, drain.

``EventStream`` is a raw ASGI response rather than Starlette's StreamingResponse because it
must do three things at once: relay frames, send a ``: ping`` comment after every
``heartbeat_s`` of silence, and notice both a client disconnect (to cancel the task) and the
replica draining (to end the stream with a retryable frame). The frame generator runs in its
own task feeding a small queue, because cancelling ``__anext__`` of TaskService.events()
would close it.

The OpenAI format sends only ``data:`` lines and comments, never ``id:`` or ``retry:``: the
official client breaks on them. A stream is never cut silently: it ends with its terminal
event (``done``, or ``data: [DONE]`` for a completed OpenAI stream), or with an error frame —
the drain's at the end of its grace, ``revoked_frame`` when its token is revoked (``revoked``
is set, inferq.services.drain; ``REVOKED_NATIVE``, ``REVOKED_OPENAI``), or ``error_frame`` when
reading the events failed (after the reads' own retries, see inferq.services.waits) — which
the ``openai`` client raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from inferq.api.render import task_json
from inferq.domain.task import TaskStatus
from inferq.jsontext import dumps
from inferq.services.waits import ChunkEvent, Event, ResetEvent, StatusEvent

log = structlog.get_logger(__name__)

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
_END = object()

_REVOKED = orjson.dumps(
    {
        "error": {
            "message": "this token was revoked",
            "type": "authentication_error",
            "code": "token_revoked",
            "param": None,
        }
    }
)
REVOKED_NATIVE = b"event: error\ndata: " + _REVOKED + b"\n\n"
REVOKED_OPENAI = b"data: " + _REVOKED + b"\n\n"


def _frame(event: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\n".encode() + b"data: " + dumps(data) + b"\n\n"


async def close_quietly(it: AsyncIterator[Any]) -> None:
    """Close an async generator now (its waiter leaves the hub) instead of at GC."""
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """``first``, then the events of ``rest`` (closed with this generator)."""
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await close_quietly(rest)


async def native_frames(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """status / chunk (with ``id: attempt:seq``) / reset frames, then one ``done``."""
    try:
        async for frame in _native(events):
            yield frame
    finally:
        await close_quietly(events)


async def _native(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    async for event in events:
        if isinstance(event, ChunkEvent):
            head = f"id: {event.attempt}:{event.seq}\nevent: chunk\ndata: ".encode()
            yield head + event.data.encode() + b"\n\n"
        elif isinstance(event, ResetEvent):
            yield _frame("reset", {"attempt": event.attempt, "reason": event.reason})
        elif event.task.terminal:
            yield _frame("done", task_json(event.task))
            return
        else:
            task = event.task
            yield _frame(
                "status", {"id": str(task.id), "status": task.status.value, "attempt": task.attempt}
            )


def openai_error_frame(message: str, code: str, type_: str = "server_error") -> bytes:
    body = {"error": {"message": message, "type": type_, "code": code, "param": None}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def openai_frames(
    events: AsyncIterator[Event], on_abandon: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """Each chunk as ``data: <chunk>``, then ``data: [DONE]`` or one error frame.

    A reset before any chunk was relayed is invisible to the client (the retry simply streams);
    after one, the stream cannot be repaired, so it ends with ``worker_lost`` and the task is
    abandoned through ``on_abandon`` (nobody can read its answer any more).
    """
    try:
        async for frame in _openai(events, on_abandon):
            yield frame
    finally:
        await close_quietly(events)


async def _openai(
    events: AsyncIterator[Event], on_abandon: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    relayed = False
    async for event in events:
        if isinstance(event, ChunkEvent):
            relayed = True
            yield b"data: " + event.data.encode() + b"\n\n"
        elif isinstance(event, ResetEvent):
            if relayed:
                yield openai_error_frame(
                    "the worker was lost in the middle of the stream; retry the request",
                    "worker_lost",
                )
                await on_abandon()
                return
        elif isinstance(event, StatusEvent) and event.task.terminal:
            task = event.task
            if task.status is TaskStatus.COMPLETED:
                yield DONE
            elif task.status is TaskStatus.CANCELLED:
                yield openai_error_frame(
                    task.error_message or "the task was cancelled", "task_cancelled"
                )
            else:
                yield openai_error_frame(task.error_message or "the task failed", "task_failed")
            return


class EventStream(Response):
    """An ASGI response that relays ``frames`` as ``text/event-stream``."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        heartbeat_s: float,
        drain: asyncio.Event,
        drain_frame: bytes,
        error_frame: bytes,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
        on_error: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
        revoked: asyncio.Event | None = None,
        revoked_frame: bytes = REVOKED_NATIVE,
    ) -> None:
        super().__init__(status_code=200)
        self.revoked = revoked
        self.revoked_frame = revoked_frame
        self.frames = frames
        self.heartbeat_s = heartbeat_s
        self.drain = drain
        self.drain_frame = drain_frame
        self.error_frame = error_frame
        self.on_disconnect = on_disconnect
        self.on_drain = on_drain
        self.on_error = on_error
        self.on_close = on_close
        self.extra_headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._relay(receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _relay(self, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.lower().encode(), v.encode()) for k, v in self.extra_headers.items()),
        ]
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        pump = asyncio.create_task(self._pump(queue))
        gone = asyncio.create_task(_disconnected(receive))
        drained = asyncio.create_task(self.drain.wait())
        revoked = asyncio.create_task((self.revoked or asyncio.Event()).wait())
        client_left = was_drained = failed = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, gone, drained, revoked},
                    timeout=self.heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if getter not in done:
                    getter.cancel()
                if gone in done:
                    client_left = True
                    break
                if getter in done:
                    item = getter.result()
                    if item is _END:
                        break
                    if isinstance(item, BaseException):
                        # Never a silent end: the client is told to retry or resume.
                        failed = True
                        await self._send(send, self.error_frame)
                        break
                    await self._send(send, item)
                elif drained in done:
                    was_drained = True
                    await self._send(send, self.drain_frame)
                    break
                elif revoked in done:
                    # Like a drain: the caller may not read on, so its task is abandoned.
                    was_drained = True
                    await self._send(send, self.revoked_frame)
                    break
                else:
                    await self._send(send, PING)
            if not client_left:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            client_left = True
        finally:
            for fut in (pump, gone, drained, revoked):
                fut.cancel()
            with contextlib.suppress(BaseException):
                await pump
            await close_quietly(self.frames)
        if client_left and self.on_disconnect is not None:
            await self.on_disconnect()
        elif was_drained and self.on_drain is not None:
            await self.on_drain()
        elif failed and self.on_error is not None:
            await self.on_error()

    @staticmethod
    async def _send(send: Send, frame: bytes) -> None:
        await send({"type": "http.response.body", "body": frame, "more_body": True})

    async def _pump(self, queue: asyncio.Queue[Any]) -> None:
        try:
            async for frame in self.frames:
                await queue.put(frame)
        except Exception as exc:
            log.warning("stream_failed", error=str(exc) or type(exc).__name__)
            await queue.put(exc)
            return
        await queue.put(_END)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
