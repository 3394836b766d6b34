"""The composition root of `inferq serve`: pool → listener → service → maintenance → HTTP.

``Replica`` starts the parts in that order and stops them in reverse; tests use it to run
real apps in-process. ``serve_command`` adds the embedded database, uvicorn (uvloop +
httptools) and the drain on SIGTERM/SIGINT:

1. the drain switch flips: /readyz answers 503, new work (submit, wait, stream, bind, claim)
   gets 503 + Retry-After, open waits answer 503 and open streams end with a retryable error
   frame, worker long-polls return empty;
2. after ``drain_delay_s`` (so a load balancer sees /readyz red) uvicorn stops accepting and
   waits for the remaining requests — worker writes still finish — up to what is left of
   ``shutdown_grace_s``;
3. maintenance, the relay (flushing buffered chunks), the listener and the pool stop.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from types import FrameType, TracebackType
from typing import Any

import structlog
import uvicorn

from inferq.api import ApiContext, create_app
from inferq.db.listener import Listener
from inferq.db.migrations import Migrator
from inferq.db.pool import Pool, create_pool
from inferq.maintenance import Maintenance
from inferq.relay import ChunkRelay
from inferq.runtime import freeze_startup_heap, run, uvicorn_config
from inferq.service import TaskService
from inferq.settings import Settings
from inferq.wakeups import Hub

log = structlog.get_logger(__name__)


class Replica:
    """One replica's parts around ``dsn``; ``async with`` starts and stops them."""

    def __init__(self, settings: Settings, dsn: str, *, maintenance: bool = True) -> None:
        self.settings = settings.model_copy(update={"database_url": dsn})
        self.dsn = dsn
        self.run_maintenance = maintenance
        self.pool: Pool | None = None
        self.listener: Listener | None = None
        self.service: TaskService | None = None
        self.maintenance: Maintenance | None = None
        self.ctx: ApiContext | None = None

    async def start(self) -> None:
        """Refuse a database that is behind (DatabaseBehind names `inferq migrate`), then
        start every part."""
        await asyncio.to_thread(Migrator(self.dsn).check)
        settings = self.settings
        self.pool = create_pool(settings, self.dsn)
        await self.pool.open(wait=True, timeout=30.0)
        hub = Hub()
        self.listener = Listener(
            settings,
            hub,
            on_token_revoked=self._token_revoked,
            dsn=settings.listen_database_url or self.dsn,
        )
        await self.listener.start()
        relay = ChunkRelay(self.pool, settings)
        self.service = TaskService(self.pool, settings, hub=hub, relay=relay)
        if self.run_maintenance:
            self.maintenance = Maintenance(self.pool, settings)
            self.maintenance.start()
        self.ctx = ApiContext(settings, self.pool, self.service, listener=self.listener)
        log.info("replica_started", listener_healthy=self.listener.healthy)

    async def stop(self) -> None:
        """Stop in reverse order; safe after a partial start."""
        if self.maintenance is not None:
            await self.maintenance.stop()
        if self.service is not None:
            await self.service.stop()
        if self.listener is not None:
            await self.listener.stop()
        if self.pool is not None:
            await self.pool.close()
        log.info("replica_stopped")

    def _token_revoked(self, token_id: str) -> None:
        if self.ctx is not None:
            self.ctx.auth.invalidate(token_id)

    def app(self) -> Any:
        """The FastAPI app of this replica (after start)."""
        assert self.ctx is not None, "start the replica first"
        return create_app(self.ctx)

    async def __aenter__(self) -> Replica:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class DrainingServer(uvicorn.Server):
    """uvicorn, with the drain of the module docstring instead of an immediate stop."""

    def __init__(self, config: uvicorn.Config, replica: Replica) -> None:
        super().__init__(config)
        self.replica = replica
        self.drain_started: float | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: the signal is handled, not re-raised at exit.
        if self.drain_started is not None:
            self.force_exit = self.should_exit = True
            return
        self.drain_started = time.monotonic()
        self._loop.call_soon_threadsafe(self.begin_drain, signal.Signals(sig).name)

    def begin_drain(self, reason: str = "requested") -> None:
        """Flip the drain switch and schedule the stop (idempotent)."""
        if self._drain_task is not None:
            return
        if self.drain_started is None:
            self.drain_started = time.monotonic()
        assert self.replica.ctx is not None
        self.replica.ctx.drain.start()
        log.info("drain_started", reason=reason)
        self._drain_task = asyncio.create_task(self._stop_after_delay())

    async def _stop_after_delay(self) -> None:
        settings = self.replica.settings
        await asyncio.sleep(min(settings.drain_delay_s, settings.shutdown_grace_s / 2))
        elapsed = time.monotonic() - (self.drain_started or time.monotonic())
        self.config.timeout_graceful_shutdown = max(0, int(settings.shutdown_grace_s - elapsed - 1))
        self.should_exit = True


async def serve(settings: Settings, dsn: str, host: str, port: int) -> None:
    """Run one replica until SIGTERM/SIGINT, then drain and stop."""
    async with Replica(settings, dsn) as replica:
        config = uvicorn_config(
            replica.app(),
            host=host,
            port=port,
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        )
        server = DrainingServer(config, replica)
        freeze_startup_heap()
        log.info("server_started", url=f"http://{host}:{port}")
        await server.serve()


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq serve`: the embedded database when no URL is set, then one replica."""
    update: dict[str, Any] = {}
    if getattr(args, "host", None):
        update["host"] = args.host
    if getattr(args, "port", None) is not None:
        update["port"] = args.port
    settings = settings.model_copy(update=update)
    dsn = settings.database_url
    if dsn:
        run(serve(settings, dsn, settings.host, settings.port))
        return 0
    from inferq.embedded import embedded_dsn, stop_embedded

    dsn = embedded_dsn(settings)
    try:
        run(serve(settings, dsn, settings.host, settings.port))
    finally:
        stop_embedded()
    return 0
