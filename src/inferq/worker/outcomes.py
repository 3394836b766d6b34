"""OutcomeBatcher: the completes and fails that finish close together, posted in one call.

Design decisions:
- The window is one event-loop tick, not a timer: the first outcome schedules a send with
  ``call_soon``, and everything queued before that callback runs (tasks that were claimed
  together finish in the same tick) rides along. A lone task is never held back.
- At most ``max_in_flight`` calls are on the wire; outcomes that arrive meanwhile wait for a
  free slot, so under load batches grow by themselves instead of requests multiplying. A call
  carries at most ``max_items`` outcomes and ``max_bytes`` of them (each is encoded once, when
  it is queued), well under the daemon's body limit (INFERQ_MAX_BODY_BYTES, 1 MiB).
- Each caller awaits its own item's answer and gets exactly what the single route would have
  raised (LeaseLostError, TaskNotFoundError ...), so the runner cannot tell the difference.
- A call refused as a whole for its body (400/413/422: one response nests too deep, a NUL, too
  many bytes together) is retried item by item on the single routes, where each item meets
  its own answer. A daemon without the outcomes route (404 route_not_found, 405) is remembered
  and the single routes are used from then on.
- An item whose caller was cancelled before its call left is dropped from the queue: the
  runner gave the task up (cancelled, lost, or released on shutdown).
- ``claim_room(session_id, items)`` lets the caller ask for more work in the same call (the
  worker answers how many tasks it could take once these items are done, when no claim
  long-poll is open, else 0); what comes back goes to ``on_claimed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from inferq.wire import JsonValue, WorkerTask
from inferq.worker.client import WorkerClient, encode_outcome
from inferq.worker.errors import WorkerApiError, error_for

_WHOLE_BODY_REFUSED = frozenset({400, 413, 415, 422})


@dataclass(eq=False, slots=True)
class _Item:
    task: WorkerTask
    session_id: UUID
    response: JsonValue
    error: str | None
    future: asyncio.Future[dict[str, Any]]
    wire: bytes = b""


class OutcomeBatcher:
    """Posts outcomes through ``client`` in batches; :meth:`complete` and :meth:`fail` return
    once the daemon answered for that task. Call :meth:`aclose` to wait for calls in flight."""

    def __init__(
        self,
        client: WorkerClient,
        *,
        max_in_flight: int = 4,
        max_items: int = 256,
        max_bytes: int = 512 * 1024,
        claim_room: Callable[[UUID, int], int] | None = None,
        on_claimed: Callable[[list[WorkerTask], UUID], None] | None = None,
    ) -> None:
        self.client = client
        self.max_in_flight = max_in_flight
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.claim_room = claim_room
        self.on_claimed = on_claimed
        self.batched = True  # False once the daemon turned out not to know the route
        self.calls = 0
        self._queue: list[_Item] = []
        self._scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()

    async def complete(self, task: WorkerTask, session_id: UUID, response: JsonValue) -> None:
        """Store the final response. Raises what ``client.complete`` would raise."""
        await self._submit(task, session_id, response, None)

    async def fail(self, task: WorkerTask, session_id: UUID, message: str) -> None:
        """End the task in error with ``message``. Raises what ``client.fail`` would raise."""
        await self._submit(task, session_id, None, message)

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Wait for the calls on the wire (their callers may have gone), at most
        ``timeout_s``; then cancel what is left."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self._in_flight or self._queue:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=remaining)
            else:
                await asyncio.sleep(0)
        for item in self._queue:
            item.future.cancel()
        self._queue.clear()
        calls = list(self._in_flight)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    async def _submit(
        self, task: WorkerTask, session_id: UUID, response: JsonValue, error: str | None
    ) -> None:
        loop = asyncio.get_running_loop()
        item = _Item(task, session_id, response, error, loop.create_future())
        item.wire = encode_outcome(task, response, error)
        self._queue.append(item)
        self._schedule()
        await item.future

    def _schedule(self) -> None:
        if self._queue and not self._scheduled and len(self._in_flight) < self.max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_next)

    def _send_next(self) -> None:
        self._scheduled = False
        self._queue = [i for i in self._queue if not i.future.done()]
        if not self._queue:
            return
        # One call per session: the session id is in the route.
        sid = self._queue[0].session_id
        batch: list[_Item] = []
        size = 0
        for item in self._queue:
            if item.session_id != sid:
                continue
            if batch and (len(batch) == self.max_items or size + len(item.wire) > self.max_bytes):
                break
            batch.append(item)
            size += len(item.wire)
        taken = {id(i) for i in batch}
        self._queue = [i for i in self._queue if id(i) not in taken]
        call = asyncio.create_task(self._post(sid, batch), name="inferq-outcomes")
        self._in_flight.add(call)
        call.add_done_callback(self._sent)
        self._schedule()

    def _sent(self, call: asyncio.Task[None]) -> None:
        self._in_flight.discard(call)
        self._schedule()

    async def _post(self, sid: UUID, batch: list[_Item]) -> None:
        try:
            if self.batched:
                await self._post_batch(sid, batch)
            else:
                await self._post_singly(batch)
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        except Exception as exc:  # a malformed answer: every caller learns of it
            _settle_all(batch, _unexpected(exc))

    async def _post_batch(self, sid: UUID, batch: list[_Item]) -> None:
        room = self.claim_room(sid, len(batch)) if self.claim_room is not None else 0
        self.calls += 1
        try:
            results, claimed = await self.client.outcomes(sid, [i.wire for i in batch], room)
        except WorkerApiError as exc:
            if exc.status in (404, 405) and exc.code in ("route_not_found", "method_not_allowed"):
                self.batched = False  # an older daemon: the single routes from now on
                await self._post_singly(batch)
            elif exc.status in _WHOLE_BODY_REFUSED:
                await self._post_singly(batch)
            else:
                _settle_all(batch, exc)
            return
        if claimed and self.on_claimed is not None:
            self.on_claimed(claimed, sid)
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if result["status_code"] < 400:
                item.future.set_result(result)
            else:
                item.future.set_exception(
                    error_for(result["status_code"], {"error": result.get("error")})
                )

    async def _post_singly(self, batch: list[_Item]) -> None:
        async def one(item: _Item) -> None:
            self.calls += 1
            try:
                if item.error is not None:
                    task = await self.client.fail(item.task, item.session_id, item.error)
                else:
                    task = await self.client.complete(item.task, item.session_id, item.response)
            except WorkerApiError as exc:
                _settle_all([item], exc)
            except Exception as exc:  # this item's answer only: the others go on
                _settle_all([item], _unexpected(exc))
            else:
                state = {"id": task.id, "status": task.status, "attempt": task.attempt}
                if not item.future.done():
                    item.future.set_result({"id": task.id, "status_code": 200, "task": state})

        await asyncio.gather(*(one(i) for i in batch))


def _unexpected(exc: Exception) -> WorkerApiError:
    """A failure that is not a daemon's answer (a malformed body, a closed client), as the
    WorkerApiError the runner handles: it logs the task as abandoned, and the daemon gives the
    task to another worker once its lease ends."""
    if isinstance(exc, WorkerApiError):
        return exc
    error = WorkerApiError(f"the outcome call failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _settle_all(batch: list[_Item], exc: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)
