"""`inferq worker`: run a Worker with the echo backend or in front of an OpenAI-compatible server.

The first SIGTERM or SIGINT starts a graceful shutdown (INFERQ_SHUTDOWN_GRACE_S for running
tasks, then release and unbind); a second one stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

import structlog

from inferq.runtime import freeze_startup_heap, run
from inferq.worker.backends import EchoBackend, OpenAIBackend
from inferq.worker.client import WorkerClient
from inferq.worker.errors import AuthenticationError, UnavailableError, WorkerApiError
from inferq.worker.runner import Worker

if TYPE_CHECKING:
    from inferq.settings import Settings

log = structlog.get_logger("inferq.worker")


def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run until signalled; 0 after a clean shutdown, 2 when the daemon refuses the token,
    1 on any other daemon error. An unreachable daemon is waited for, with warnings."""
    # One line per worker request would drown the claim and outcome events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        run(_serve(args, settings.shutdown_grace_s))
    except AuthenticationError as exc:
        print(f"inferq worker: the daemon refused the token: {exc.message}", file=sys.stderr)
        return 2
    except (UnavailableError, WorkerApiError) as exc:
        print(f"inferq worker: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 130
    return 0


async def _serve(args: argparse.Namespace, grace_s: float) -> None:
    if args.capacity < 1:
        raise WorkerApiError("--capacity must be at least 1")
    if args.backend == "echo":
        backend: EchoBackend | OpenAIBackend = EchoBackend(delay_s=args.echo_delay)
    else:
        backend = OpenAIBackend(
            args.backend,
            api_key=args.backend_api_key,
            timeout_s=args.backend_timeout,
            capacity=args.capacity,
        )
    async with WorkerClient(args.url, args.token) as client:
        worker = Worker(
            client, args.pool, backend, capacity=args.capacity, name=args.name, grace_s=grace_s
        )
        _install_signals(worker)
        freeze_startup_heap()
        log.info(
            "worker_started",
            url=args.url,
            pools=args.pool,
            capacity=args.capacity,
            backend="echo" if args.backend == "echo" else backend.base_url,  # type: ignore[union-attr]
        )
        try:
            await worker.run()
        finally:
            await backend.aclose()
            log.info("worker_stopped")


def _install_signals(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        if len(signalled) == 1:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            worker.stop()
        elif main is not None:
            main.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
