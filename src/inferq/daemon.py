"""The composition root of `inferq serve`: pool → repositories → listener → services →
maintenance → HTTP.

``uvicorn_config``: the HTTP server settings of ``inferq serve``, shared with the bench's
parked app (which measures that server's own memory floor) and the tests' in-process servers.

``Replica`` starts the parts in that order and stops them in reverse; tests use it to run
real apps in-process. ``serve_command`` adds the embedded database, uvicorn (uvloop +
httptools, with request heads bounded before any application code runs: see
inferq.http_protocol) and the drain on SIGTERM/SIGINT:

1. the drain switch flips: /readyz answers 503, new work (submit, wait, stream, bind, claim)
   gets 503 + Retry-After, worker long-polls return empty;
2. after ``drain_delay_s`` (so a load balancer sees /readyz red) uvicorn stops accepting and
   waits for the remaining requests — worker writes still finish; open waits and streams get
   what is left of ``drain_grace_s``, then answer 503 (see inferq.services.drain);
3. maintenance, the relay (flushing buffered chunks), the listener and the pool stop, each
   within a bound: the process is gone ``drain_grace_s`` + a few seconds after the signal,
   database or not.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

import structlog
import uvicorn

from inferq.api import create_app
from inferq.api.app import metrics_app
from inferq.db.batches import BatchRepository
from inferq.db.chunks import ChunkRepository
from inferq.db.dashboard import DashboardRepository
from inferq.db.files import FileRepository
from inferq.db.leases import LeaseRepository
from inferq.db.listener import Listener
from inferq.db.llms import LlmRepository
from inferq.db.migrations import Migrator
from inferq.db.pool import Pool, create_pool
from inferq.db.quotas import QuotaRepository
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.stats import StatsRepository
from inferq.db.tasks import TaskRepository
from inferq.db.tokens import TokenRepository
from inferq.db.usage import UsageRepository
from inferq.http_protocol import BoundedHttpToolsProtocol, HttpLimits
from inferq.maintenance import Maintenance, QueueRollup
from inferq.metrics import Metrics
from inferq.runtime import freeze_startup_heap, run
from inferq.services import (
    AdminService,
    Authenticator,
    BatchService,
    ClaimService,
    CompletionService,
    DashboardService,
    Drain,
    FileService,
    HealthService,
    Services,
    TaskService,
)
from inferq.services.batches import BatchKeeper
from inferq.services.limits import PendingLimiter, WaitSlots
from inferq.services.quotas import QuotaService, RatePruner
from inferq.services.registry import Registry
from inferq.services.relay import ChunkRelay
from inferq.services.revocations import RevocationWatch
from inferq.services.usage import UsageMeter, UsageService
from inferq.services.waits import WaitService
from inferq.settings import Settings
from inferq.wakeups import Hub

log = structlog.get_logger(__name__)

# What the stop may take past the drain's grace: the last answers going out (uvicorn), then
# the parts stopping, all of them within one budget (an unreachable database cannot hold the
# process: a statement or connection attempt still waiting is cut at the budget's end).
STOP_SLACK_S = 1
PARTS_STOP_S = 2.0
# After the grace, when the process exits even if a part is stuck.
STOP_DEADLINE_S = 4.5


def _force_exit() -> None:
    log.warning("stop_forced", reason="a part did not stop in time (see the lines above)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Replica:
    """One replica's parts around ``dsn``; ``async with`` starts and stops them.

    The composition root: each repository is built once here and handed to the services and
    maintenance loops that use it.
    """

    def __init__(self, settings: Settings, dsn: str, *, maintenance: bool = True) -> None:
        self.settings = settings.model_copy(update={"database_url": dsn})
        self.dsn = dsn
        self.run_maintenance = maintenance
        self.pool: Pool | None = None
        self.listener: Listener | None = None
        self.waits: WaitService | None = None
        self.relay: ChunkRelay | None = None
        self.maintenance: Maintenance | None = None
        self.revocations: RevocationWatch | None = None
        self.services: Services | None = None

    async def start(self) -> None:
        """Refuse a database that is behind (DatabaseBehind names `inferq migrate`), then
        start every part."""
        await asyncio.to_thread(Migrator(self.dsn).check)
        settings = self.settings
        self.pool = pool = create_pool(settings, self.dsn)
        await pool.open(wait=True, timeout=30.0)
        tasks = TaskRepository(
            pool,
            aging_s=settings.aging_s,
            fair_share_half_life_s=settings.fair_share_half_life_s,
            max_discarded_per_hour=settings.max_discarded_per_hour,
        )
        chunks = ChunkRepository(pool)
        sessions, tokens = WorkerSessionRepository(pool), TokenRepository(pool)
        hub = Hub()
        self.listener = Listener(
            settings,
            hub,
            on_token_revoked=self._token_revoked,
            dsn=settings.listen_database_url or self.dsn,
        )
        await self.listener.start()
        self.waits = waits = WaitService(tasks, chunks, settings, hub=hub)
        self.relay = relay = ChunkRelay(chunks, tasks, settings)
        llms, files, batches = LlmRepository(pool), FileRepository(pool), BatchRepository(pool)
        dashboard = DashboardRepository(pool)
        if self.run_maintenance:
            keeper = BatchKeeper(batches, files, llms, settings)
            self.maintenance = Maintenance(
                tasks=tasks,
                chunks=chunks,
                sessions=sessions,
                leases=LeaseRepository(pool),
                settings=settings,
                more=[
                    (keeper, settings.batch_interval_s),
                    (QueueRollup(dashboard), settings.dashboard_rollup_s),
                    (RatePruner(QuotaRepository(pool)), 60.0),  # quotas' stale minute rows
                ],
            )
            self.maintenance.start()
        self.services = build_services(
            settings,
            tasks=tasks,
            sessions=sessions,
            tokens=tokens,
            llms=llms,
            files=files,
            batches=batches,
            stats=StatsRepository(pool),
            dashboard=dashboard,
            waits=waits,
            relay=relay,
            listener=self.listener,
        )
        self.revocations = RevocationWatch(tokens, self.services.auth, settings.revocation_poll_s)
        self.revocations.start()
        log.info("replica_started", listener_healthy=self.listener.healthy)

    async def stop(self) -> None:
        """Stop in reverse order; safe after a partial start. All parts share PARTS_STOP_S:
        with the database gone, releasing leases or flushing chunks would otherwise wait for
        the pool's own timeouts."""
        parts: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if self.revocations is not None:
            parts.append(("revocations", self.revocations.stop))
        if self.maintenance is not None:
            parts.append(("maintenance", self.maintenance.stop))
        if self.waits is not None:
            parts.append(("waits", self.waits.stop))
        if self.relay is not None:
            parts.append(("relay", self.relay.stop))  # flushes buffered chunk posts
        if self.listener is not None:
            parts.append(("listener", self.listener.stop))
        if self.pool is not None:
            pool = self.pool
            parts.append(("pool", lambda: pool.close(timeout=PARTS_STOP_S / 4)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PARTS_STOP_S
        for name, stop in parts:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await stop()
            except Exception as exc:
                log.warning("part_stop_failed", part=name, error=str(exc) or type(exc).__name__)
        log.info("replica_stopped")

    def _token_revoked(self, token_id: str) -> None:
        if self.services is not None:
            self.services.auth.invalidate(token_id)

    def app(self, *, fast_path: bool = True) -> Any:
        """The FastAPI app of this replica (after start)."""
        assert self.services is not None, "start the replica first"
        return create_app(self.services, fast_path=fast_path)

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


def build_services(
    settings: Settings,
    *,
    tasks: TaskRepository,
    sessions: WorkerSessionRepository,
    tokens: TokenRepository,
    llms: LlmRepository,
    files: FileRepository,
    batches: BatchRepository,
    stats: StatsRepository,
    waits: WaitService,
    relay: ChunkRelay,
    listener: Listener | None = None,
    dashboard: DashboardRepository | None = None,
) -> Services:
    """Every service of one replica, wired to the given repositories."""
    metrics = Metrics()

    def generation() -> int:
        # Revocations sent while the listener was away are lost: a reconnect drops the cache.
        return listener.stats.reconnects if listener is not None else 0

    auth = Authenticator(tokens, generation=generation)
    drain = Drain(settings.drain_grace_s, is_revoked=auth.is_revoked)
    auth.subscribe(drain.revoke)  # a revoked token's open waits and streams end
    registry = Registry(llms)
    slots = WaitSlots(settings.max_waits_per_token, metrics)
    pending = PendingLimiter(tasks, settings.max_pending_per_token)
    # Quotas and usage (issue #15): their repositories share the tasks' pool.
    quotas = QuotaService(QuotaRepository(tasks.pool), settings.quota_refresh_s)
    usage = UsageService(UsageRepository(tasks.pool))
    meter = UsageMeter(metrics)
    task_service = TaskService(
        tasks,
        sessions,
        registry,
        waits,
        settings=settings,
        drain=drain,
        slots=slots,
        pending=pending,
        metrics=metrics,
        quotas=quotas,
    )
    admin = AdminService(registry, tokens, stats, auth)
    return Services(
        settings=settings,
        metrics=metrics,
        drain=drain,
        auth=auth,
        tasks=task_service,
        completions=CompletionService(
            task_service,
            tasks,
            sessions,
            waits,
            settings=settings,
            drain=drain,
            slots=slots,
            metrics=metrics,
        ),
        claims=ClaimService(
            tasks,
            sessions,
            waits,
            relay,
            settings=settings,
            drain=drain,
            metrics=metrics,
            meter=meter,
        ),
        admin=admin,
        health=HealthService(
            stats,
            metrics,
            drain,
            waits.hub,
            listener,
            interval_s=settings.metrics_interval_s,
            token=settings.metrics_token.get_secret_value() if settings.metrics_token else None,
            own_port=settings.metrics_port is not None,
        ),
        files=FileService(files, settings),
        batches=BatchService(batches, files, settings),
        dashboard=DashboardService(
            dashboard or DashboardRepository(stats.pool),
            auth=auth,
            admin=admin,
            tasks=tasks,
            batches=batches,
            files=files,
            waits=waits,
            session_s=settings.dashboard_session_s,
        ),
        quotas=quotas,
        usage=usage,
    )


def uvicorn_config(app: Any, *, limits: HttpLimits | None = None, **options: Any) -> uvicorn.Config:
    """uvicorn.Config for ``app`` as ``inferq serve`` runs it: httptools with request heads,
    bodies and connections bounded by ``limits`` (inferq.http_protocol; the defaults of
    Settings when None), no WebSocket upgrades, no lifespan (the caller starts and stops the
    replica), inferq's own logging (no access log, no default log config), no Server header;
    ``options`` add to or override these."""
    defaults: dict[str, Any] = {
        "http": BoundedHttpToolsProtocol.with_limits(limits or HttpLimits()),
        "ws": "none",
        "lifespan": "off",
        "log_config": None,
        "access_log": False,
        "server_header": False,
    }
    return uvicorn.Config(app, **(defaults | options))


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
        assert self.replica.services is not None
        self.replica.services.drain.start()
        log.info("drain_started", reason=reason)
        self._drain_task = asyncio.create_task(self._stop_after_delay())
        # The promise is a stop within the grace + 5 s, database or not. A statement waiting on
        # a server that answers nothing can survive every cancellation (the driver's cancel
        # request waits for that server too): past the deadline the process exits anyway.
        settings = self.replica.settings
        watchdog = threading.Timer(settings.drain_grace_s + STOP_DEADLINE_S, _force_exit)
        watchdog.daemon = True
        watchdog.start()

    async def _stop_after_delay(self) -> None:
        settings = self.replica.settings
        await asyncio.sleep(min(settings.drain_delay_s, settings.drain_grace_s))
        elapsed = time.monotonic() - (self.drain_started or time.monotonic())
        # The open waits end by themselves when the drain's grace is over (503, or an error
        # frame); uvicorn waits for them, plus a moment for the answers to go out.
        left_s = max(0.0, settings.drain_grace_s - elapsed)
        self.config.timeout_graceful_shutdown = math.ceil(left_s) + STOP_SLACK_S
        self.should_exit = True


class MetricsServer(uvicorn.Server):
    """The INFERQ_METRICS_PORT listener: serves inferq.api.app.metrics_app and leaves the
    process's signals to the DrainingServer, which stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: Settings, dsn: str, host: str, port: int) -> None:
    """Run one replica until SIGTERM/SIGINT, then drain and stop."""
    async with Replica(settings, dsn) as replica:
        limits = HttpLimits.from_settings(settings)
        config = uvicorn_config(
            replica.app(),
            limits=limits,
            host=host,
            port=port,
            timeout_graceful_shutdown=math.ceil(settings.drain_grace_s) + STOP_SLACK_S,
        )
        server = DrainingServer(config, replica)
        side: MetricsServer | None = None
        if settings.metrics_port is not None:
            assert replica.services is not None
            side = MetricsServer(
                uvicorn_config(
                    metrics_app(replica.services),
                    limits=limits,
                    host=host,
                    port=settings.metrics_port,
                )
            )
        side_task = asyncio.create_task(side.serve()) if side is not None else None
        freeze_startup_heap()
        log.info(
            "server_started",
            url=f"http://{host}:{port}",
            metrics_port=settings.metrics_port,
        )
        try:
            await server.serve()
        finally:
            if side is not None and side_task is not None:
                side.should_exit = True
                await side_task


def serve_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """The settings of `inferq serve`: its --host and --port win over the environment (the
    systemd template gives each instance its port on the command line)."""
    update: dict[str, Any] = {}
    if getattr(args, "host", None):
        update["host"] = args.host
    if getattr(args, "port", None) is not None:
        update["port"] = args.port
    return settings.model_copy(update=update)


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    """`inferq serve`: the embedded database when no URL is set, then one replica."""
    settings = serve_settings(args, settings)
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
