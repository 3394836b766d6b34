"""Worker: binds a session, long-polls for tasks, runs a handler per task, heartbeats, drains.

Choices not spelled out in docs/protocol.md:
- Only streaming tasks are started (claimed -> running); the state machine lets a non-streaming
  task complete straight from claimed, which saves one notifying commit per task. The start call
  runs concurrently with the handler and gates the first chunk post and the outcome, so it adds
  no latency before the handler begins.
- A chunk post or outcome that gets 409 means the lease is gone (reverted, cancelled, claimed
  elsewhere): the handler is cancelled and nothing else is posted for that attempt.
- A 404 session_not_found (the session was reaped) drops every running task, since the daemon
  reverted them, and binds a new session.
- A claimed task must be acknowledged within the daemon's ``claim_ack_s`` or it goes back to
  the queue (a frozen worker's tasks move on). A streaming task's start acknowledges it, an
  outcome does; the tasks that are still running unstarted a third of that time after their
  claim are named in an early heartbeat.
- Outcomes go through an OutcomeBatcher: those that finish in the same loop tick share one
  call. When the claim loop is parked because every slot is taken, that call also claims as
  many tasks as its outcomes free, so a saturated worker needs one round trip per batch.
- Shutdown (stop()): stop claiming, wait up to ``grace_s`` for running handlers, cancel and
  release the rest, then unbind (which also reverts anything an interrupted claim had taken).
  The calls after the grace period share a deadline (``FINAL_CALLS_S``), so the worker stops
  within grace + a few seconds even when the daemon cannot be reached.
- A handler that raises BackendUnavailableError gives its task back (release: no attempt
  used up). The worker stops claiming at once, lets its other tasks end as a shutdown would,
  unbinds, and binds again only once ``backend_check`` passes (checked with backoff, also
  before the first bind). Without a check it binds again after the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal
from uuid import UUID

import structlog

from inferq.wire import JsonValue, WorkerTask
from inferq.worker.client import WorkerClient
from inferq.worker.context import Handler, TaskContext
from inferq.worker.errors import (
    AuthenticationError,
    BackendUnavailableError,
    LeaseLostError,
    SessionNotFoundError,
    UnavailableError,
    WorkerApiError,
)
from inferq.worker.gate import BackendCheck, BackendGate
from inferq.worker.outcomes import OutcomeBatcher
from inferq.worker.stream import ChunkStream

log = structlog.get_logger("inferq.worker")

# After the grace period, how long the last calls (release, outcomes, unbind) may take.
FINAL_CALLS_S = 3.0

DropReason = Literal["cancelled", "lost", "released"]


@dataclass(eq=False)
class _Held:
    task: WorkerTask
    session_id: UUID
    runner: asyncio.Task[None] | None = None
    dropped: DropReason | None = None
    claimed_at: float = field(default_factory=time.monotonic)


class Worker:
    """Serves ``pools`` with ``handler``, at most ``capacity`` tasks at once. Call :meth:`run`."""

    def __init__(
        self,
        client: WorkerClient,
        pools: Sequence[str],
        handler: Handler,
        *,
        capacity: int = 1,
        name: str | None = None,
        grace_s: float = 10.0,
        claim_wait_s: float = 30.0,
        backend_check: BackendCheck | None = None,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.client = client
        self.pools = list(pools)
        self.handler = handler
        self.capacity = capacity
        self.name = name
        self.grace_s = grace_s
        self.claim_wait_s = claim_wait_s
        self.backend_gate = BackendGate(backend_check, backoff_max_s)
        self.session_id: UUID | None = None
        self.heartbeat_s = 10.0
        # The daemon's INFERQ_CLAIM_ACK_S (None: it asks for no acknowledgement).
        self.claim_ack_s: float | None = None
        self._ack_due = asyncio.Event()  # a claimed task awaits its acknowledgement
        self._held: dict[UUID, _Held] = {}
        self._freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_at = 0.0  # event-loop time of stop()
        self._rebind_lock = asyncio.Lock()
        self._claim_parked = False  # the claim loop waits for a free slot (no long-poll open)
        # The claim loop's call in flight, with the session it claims for.
        self._claim_call: tuple[UUID, asyncio.Future[list[WorkerTask]]] | None = None
        self.outcomes = OutcomeBatcher(
            client, claim_room=self._claim_room, on_claimed=self._on_claimed
        )

    @property
    def running(self) -> list[UUID]:
        """Ids of the tasks this worker holds right now."""
        return list(self._held)

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler in the loop)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stop_at = asyncio.get_running_loop().time()
        self.client.deadline = self._stop_at + self.grace_s + FINAL_CALLS_S

    async def run(self) -> None:
        """Serve until :meth:`stop`: wait for the backend, bind, claim and run tasks, then
        drain and unbind; again after the backend went down. Raises AuthenticationError
        when the daemon refuses the token; an unreachable daemon is retried until stop()."""
        while not self._stopping.is_set():
            if not await self._until(self.backend_gate.wait_ready()):
                return
            if not await self._until(self._bind_retrying()):
                return
            await self._serve_session()

    async def _until(self, step: Awaitable[None]) -> bool:
        """Run ``step`` unless stop() comes first; whether it ran to its end."""
        task = asyncio.ensure_future(step)
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return not task.cancelled() and task.result() is None

    async def _bind_retrying(self) -> None:
        while True:
            try:
                await self._bind()
                return
            except UnavailableError as exc:
                # A worker may start before the daemon (compose, systemd): keep trying.
                log.warning("session_bind_failed", error=str(exc))

    async def _serve_session(self) -> None:
        """Claim and run tasks until stop() or a backend failure; then drain and unbind."""
        claimer = asyncio.create_task(self._claim_loop(), name="inferq-claim")
        beater = asyncio.create_task(self._heartbeat_loop(), name="inferq-heartbeat")
        stopper = asyncio.create_task(self._stopping.wait())
        down = asyncio.create_task(self.backend_gate.down.wait())
        try:
            await asyncio.wait(
                {claimer, beater, stopper, down}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in (stopper, down, claimer):
                waiter.cancel()
            await self._drain()
            beater.cancel()
            await asyncio.gather(claimer, beater, return_exceptions=True)
            # Half of what is left for the outcomes on the wire, so the unbind keeps its share.
            await self.outcomes.aclose(self._grace_left_s(final_calls=True) / 2)
            await self._drain()  # what the last outcome calls claimed on their way back
            await self._unbind()
        for loop_task in (claimer, beater):
            if loop_task.done() and not loop_task.cancelled() and loop_task.exception():
                raise loop_task.exception()  # type: ignore[misc]
        if self.backend_gate.down.is_set():
            log.warning("worker_paused", reason="backend_unavailable")

    def _grace_left_s(self, final_calls: bool = False) -> float:
        """What is left of the grace period (and of the final calls' time after it) since
        stop(); all of ``grace_s`` when the worker is not stopping."""
        if not self._stopping.is_set():
            return self.grace_s
        end = self._stop_at + self.grace_s + (FINAL_CALLS_S if final_calls else 0.0)
        return max(0.0, end - asyncio.get_running_loop().time())

    # -- session ------------------------------------------------------------------------------

    async def _bind(self) -> None:
        bound = await self.client.bind(self.pools, self.capacity, self.name)
        self.session_id = bound.session_id
        self.heartbeat_s = bound.heartbeat_s
        self.claim_ack_s = bound.claim_ack_s
        log.info(
            "session_bound",
            session_id=str(bound.session_id),
            pools=bound.pools,
            capacity=bound.capacity,
            drained=len(bound.tasks),
        )
        for task in bound.tasks:
            self._spawn(task, bound.session_id)

    async def _rebind(self, stale: UUID) -> None:
        async with self._rebind_lock:
            if self.session_id != stale:
                return  # another loop already bound a new session
            log.warning("session_lost", session_id=str(stale), dropped=len(self._held))
            for held in list(self._held.values()):
                self._drop(held, "lost")
            try:
                await self._bind()
            except AuthenticationError:
                raise
            except WorkerApiError as exc:
                # The loops come back here with the stale id on their next call.
                log.warning("session_bind_failed", error=str(exc))
                return
            # A claim long-poll open on the lost session can never return work (the daemon
            # claims nothing for an expired session): cut it, so the new session claims now.
            if self._claim_call is not None and self._claim_call[0] == stale:
                self._claim_call[1].cancel()

    async def _unbind(self) -> None:
        if self.session_id is None:
            return
        try:
            released = await self.client.unbind(self.session_id)
        except WorkerApiError as exc:
            log.warning("session_unbind_failed", session_id=str(self.session_id), error=str(exc))
        else:
            log.info("session_unbound", session_id=str(self.session_id), released=released)

    # -- loops --------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            while len(self._held) >= self.capacity:
                self._freed.clear()
                self._claim_parked = True
                try:
                    await self._freed.wait()
                finally:
                    self._claim_parked = False
            sid = self.session_id
            assert sid is not None
            call = asyncio.ensure_future(
                self.client.claim(sid, self.capacity - len(self._held), self.claim_wait_s)
            )
            self._claim_call = (sid, call)
            try:
                tasks = await call
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the loop itself is being stopped
                continue  # _rebind cut a long-poll on the lost session: claim on the new one
            except SessionNotFoundError:
                await self._rebind(sid)
                continue
            except AuthenticationError:
                raise
            except WorkerApiError as exc:
                log.warning("claim_failed", session_id=str(sid), error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for task in tasks:
                self._spawn(task, sid)

    async def _heartbeat_loop(self) -> None:
        while True:
            # The next heartbeat is due after heartbeat_s, or sooner when claimed tasks must be
            # acknowledged: a third of the claim's first lease after they came, so that quick
            # tasks end (an outcome acknowledges too) and those of one claim go together.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_due.wait(), self.heartbeat_s)
            if self._ack_due.is_set() and self.claim_ack_s is not None:
                await asyncio.sleep(self.claim_ack_s / 3)
            self._ack_due.clear()
            sid = self.session_id
            assert sid is not None
            held = [h for h in self._held.values() if h.session_id == sid]
            try:
                beat = await self.client.heartbeat(sid, [h.task.id for h in held])
            except SessionNotFoundError:
                await self._rebind(sid)
                continue
            except WorkerApiError as exc:
                log.warning("heartbeat_failed", session_id=str(sid), error=str(exc))
                continue
            self.heartbeat_s = beat.heartbeat_s
            for reason, ids in (("cancelled", beat.cancelled), ("lost", beat.lost)):
                for task_id in ids:
                    if (h := self._held.get(task_id)) is not None:
                        self._drop(h, reason)  # type: ignore[arg-type]

    # -- tasks --------------------------------------------------------------------------------

    def _spawn(self, task: WorkerTask, session_id: UUID) -> None:
        held = _Held(task, session_id)
        self._held[task.id] = held
        if not task.streaming:
            self._ack_due.set()  # a streaming task is acknowledged by its start
        held.runner = asyncio.create_task(self._guarded(held), name=f"inferq-task-{task.id}")
        log.info(
            "task_claimed",
            task_id=str(task.id),
            attempt=task.attempt,
            pool=task.pool,
            streaming=task.streaming,
            session_id=str(session_id),
        )

    def _claim_room(self, session_id: UUID, finishing: int) -> int:
        """How many tasks an outcome call may claim: what its outcomes free, when the claim
        loop is parked on a full worker (otherwise its open long-poll takes new work)."""
        if not self._claim_parked or self._paused() or session_id != self.session_id:
            return 0
        return max(0, self.capacity - len(self._held) + finishing)

    def _paused(self) -> bool:
        return self._stopping.is_set() or self.backend_gate.down.is_set()

    def _on_claimed(self, tasks: list[WorkerTask], session_id: UUID) -> None:
        for task in tasks:
            self._spawn(task, session_id)

    def _drop(self, held: _Held, reason: DropReason) -> None:
        if held.dropped is None and held.runner is not None:
            held.dropped = reason
            held.runner.cancel()

    async def _guarded(self, held: _Held) -> None:
        ids = {"task_id": str(held.task.id), "attempt": held.task.attempt}
        try:
            await self._execute(held)
        except asyncio.CancelledError:
            if held.dropped is None:
                raise  # the whole worker is being torn down
            if held.dropped != "released":  # _drain logs it once the daemon took it back
                log.info(f"task_{held.dropped}", **ids)
        except LeaseLostError as exc:
            if (exc.task or {}).get("status") == "cancelled":  # a 409 beat the heartbeat to it
                log.info("task_cancelled", **ids)
            else:
                log.warning("task_lost", status=exc.status, error=exc.message, **ids)
        except WorkerApiError as exc:
            log.error("task_abandoned", error=str(exc), **ids)
        finally:
            self._held.pop(held.task.id, None)
            self._freed.set()

    async def _execute(self, held: _Held) -> None:
        task, sid = held.task, held.session_id
        stream = ChunkStream(partial(self.client.post_chunks, task, sid))
        gate = asyncio.ensure_future(self.client.start(task, sid)) if task.streaming else None
        handler = asyncio.create_task(self._invoke(task, TaskContext(task, stream)))
        flusher = asyncio.create_task(stream.run(gate))
        # A rejected post means the lease is gone: stop the handler burning GPU time.
        flusher.add_done_callback(lambda f: f.cancelled() or (f.exception() and handler.cancel()))
        try:
            try:
                response = await handler
            except asyncio.CancelledError:
                if flusher.done() and not flusher.cancelled() and flusher.exception():
                    raise flusher.exception() from None  # type: ignore[misc]
                raise
            except BackendUnavailableError as exc:
                flusher.cancel()
                await self._give_back(held, gate, str(exc))
                return
            except Exception as exc:
                flusher.cancel()
                await self._outcome(held, gate, error=str(exc) or type(exc).__name__)
                return
            stream.close()
            await flusher
            await self._outcome(held, gate, response=response, chunks=stream.seq)
        finally:
            for t in (handler, flusher, gate):
                if t is not None and not t.done():
                    t.cancel()

    async def _invoke(self, task: WorkerTask, ctx: TaskContext) -> JsonValue:
        return await self.handler(task, ctx)

    async def _outcome(
        self,
        held: _Held,
        gate: asyncio.Future[None] | None,
        *,
        response: JsonValue = None,
        error: str | None = None,
        chunks: int = 0,
    ) -> None:
        task, sid = held.task, held.session_id
        if gate is not None:
            await gate
        ms = round((time.monotonic() - held.claimed_at) * 1000)
        ids = {"task_id": str(task.id), "attempt": task.attempt, "duration_ms": ms}
        if error is not None:
            await self.outcomes.fail(task, sid, error)
            log.info("task_failed", error=error, **ids)
        else:
            await self.outcomes.complete(task, sid, response)
            self.backend_gate.mark_ok()
            log.info("task_completed", chunks=chunks, **ids)

    async def _give_back(self, held: _Held, gate: asyncio.Future[None] | None, why: str) -> None:
        """Release a task whose backend is down, after pausing the worker: it claims nothing
        more, so the task goes to another worker."""
        self.backend_gate.mark_down()
        if gate is not None:
            await gate  # a release racing the start call would make the start fail
        await self.client.release(held.task, held.session_id)
        log.info("task_released", reason=why, task_id=str(held.task.id), attempt=held.task.attempt)

    async def _drain(self) -> None:
        """Let running tasks finish within the grace period; release the rest."""
        runners = [h.runner for h in self._held.values() if h.runner is not None]
        if runners:
            grace_s = self._grace_left_s()
            log.info("worker_draining", running=len(runners), grace_s=round(grace_s, 2))
            await asyncio.wait(runners, timeout=grace_s)
        leftovers = list(self._held.values())
        for held in leftovers:
            self._drop(held, "released")
        await asyncio.gather(*(h.runner for h in leftovers if h.runner), return_exceptions=True)
        for held in leftovers:
            ids = {"task_id": str(held.task.id), "attempt": held.task.attempt}
            try:
                await self.client.release(held.task, held.session_id)
            except WorkerApiError as exc:
                log.warning("task_release_failed", error=str(exc), **ids)
            else:
                log.info("task_released", **ids)
