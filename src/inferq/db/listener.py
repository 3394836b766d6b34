"""Listener: the one LISTEN connection of a process, fanning notifications out to the Hub.

Design decisions:

- One autocommit connection per process, to ``settings.listen_database_url`` when set (PgBouncer
  in transaction mode cannot carry LISTEN) else ``settings.database_url``. It LISTENs on the
  constant channels of ``inferq.db.channels`` and never runs anything else but a ping.
- Payloads are parsed here (the hub never sees psycopg or JSON). A malformed payload is logged
  and skipped; since waiters re-read the database, a lost hint costs latency, not correctness.
- ``conn.notifies(timeout=listener_ping_s)`` returns at least every ping period, and then a
  ``SELECT 1`` with the same deadline proves the connection alive: a half-open TCP connection
  (peer gone without a FIN) is noticed within two ping periods instead of never. TCP
  keepalives are requested too.
- On any error the connection is dropped and reopened with jittered exponential backoff
  (0.05 s doubling to 5 s, times a random factor in [0.5, 1]). After each (re)connect the
  listener re-LISTENs and only THEN calls ``hub.resync_all()``: a notification committed
  before the LISTEN is lost, but every waiter re-reads after it, so nothing is missed.
- ``healthy`` is False while disconnected (``/readyz`` turns red). In poll-only mode no
  connection is opened at all and ``healthy`` stays True: waiters rely on the safety poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
import structlog
from psycopg import AsyncConnection, Notify, sql

from inferq.db import channels
from inferq.db.pool import connection_kwargs
from inferq.settings import Settings
from inferq.wakeups import Hub

log = structlog.get_logger(__name__)

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class ListenerStats:
    """Counters for /metrics."""

    notifications: int = 0
    malformed: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    dispatch_seconds_total: float = 0.0  # time spent parsing payloads and waking waiters
    dispatch_seconds_max: float = 0.0


class Listener:
    """Owns the LISTEN connection; start() once, stop() on shutdown."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        *,
        on_token_revoked: Callable[[str], None] | None = None,
        dsn: str | None = None,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.on_token_revoked = on_token_revoked
        self.dsn = dsn or settings.listen_database_url or settings.database_url
        self.stats = ListenerStats()
        self.backend_pid: int | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection[Any] | None = None

    @property
    def healthy(self) -> bool:
        """True while LISTENing (always True in poll-only mode, which needs no connection)."""
        return self.settings.poll_only or self._connected.is_set()

    async def start(self, *, wait_s: float = 10.0) -> None:
        """Start listening in the background; wait up to ``wait_s`` for the first LISTEN.

        Never raises for a database that is down: the listener keeps retrying and
        ``healthy`` tells whether it is connected.
        """
        if self.settings.poll_only or self._task is not None:
            return
        if not self.dsn:
            raise ValueError("no database URL for the listener: set INFERQ_DATABASE_URL")
        self._task = asyncio.create_task(self._run(), name="inferq-listener")
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s)
        except TimeoutError:
            log.warning("listener_start_timed_out", wait_s=wait_s)

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected.clear()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the listener is LISTENing; True when it is."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        failures = 0
        ever_connected = False
        while True:
            try:
                conn = await self._connect()
            except Exception as exc:
                failures += 1
                self.stats.connect_failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**failures) * random.uniform(0.5, 1)
                log.warning("listener_connect_failed", error=str(exc), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            failures = 0
            if ever_connected:
                self.stats.reconnects += 1
                log.info("listener_reconnected", backend_pid=self.backend_pid)
            else:
                log.info("listener_connected", backend_pid=self.backend_pid)
            ever_connected = True
            self._connected.set()
            # After LISTEN, never before: whatever was notified while we were away is re-read.
            self.hub.resync_all()
            try:
                await self._listen(conn)
            except Exception as exc:
                log.warning("listener_disconnected", error=str(exc), backend_pid=self.backend_pid)
            finally:
                self._connected.clear()
                self._conn = None
                await conn.close()
            await asyncio.sleep(BACKOFF_MIN_S * random.uniform(0.5, 1))

    async def _connect(self) -> AsyncConnection[Any]:
        assert self.dsn is not None
        kwargs = connection_kwargs(self.settings)
        kwargs.update(
            application_name="inferq-listener",
            keepalives=1,
            keepalives_idle=max(1, int(self.settings.listener_ping_s)),
            keepalives_interval=max(1, int(self.settings.listener_ping_s / 3)),
            keepalives_count=3,
            connect_timeout=max(2, int(self.settings.listener_ping_s)),
        )
        conn = await AsyncConnection.connect(self.dsn, **kwargs)
        try:
            for channel in channels.ALL:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.backend_pid = conn.info.backend_pid
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _listen(self, conn: AsyncConnection[Any]) -> None:
        ping_s = self.settings.listener_ping_s
        while True:
            async for notify in conn.notifies(timeout=ping_s):
                self._dispatch(notify)
            # A half-open connection would wait forever: the ping has the same deadline.
            await asyncio.wait_for(conn.execute("SELECT 1"), ping_s)

    def _dispatch(self, notify: Notify) -> None:
        started = time.perf_counter()
        self.stats.notifications += 1
        try:
            if notify.channel == channels.TASK:
                for task_id, status, pool, _attempt in orjson.loads(notify.payload):
                    self.hub.task_changed(UUID(task_id), status, pool)
            elif notify.channel == channels.CHUNK:
                for task_id, attempt, last_seq in orjson.loads(notify.payload):
                    self.hub.chunks_added(UUID(task_id), attempt, last_seq)
            elif notify.channel == channels.TOKEN:
                if self.on_token_revoked is not None:
                    self.on_token_revoked(notify.payload)
                self.hub.noticed("tokens")
            elif notify.channel == channels.SESSION:
                self.hub.noticed("sessions")
            elif notify.channel == channels.BATCH:
                self.hub.noticed("batches")
            elif notify.channel == channels.ROLLUP:
                self.hub.noticed("rollup")
        except Exception as exc:
            self.stats.malformed += 1
            log.warning(
                "notification_dropped",
                channel=notify.channel,
                payload=notify.payload[:200],
                error=str(exc),
            )
        elapsed = time.perf_counter() - started
        self.stats.dispatch_seconds_total += elapsed
        self.stats.dispatch_seconds_max = max(self.stats.dispatch_seconds_max, elapsed)
