"""`inferq worker`: run a Worker with the echo backend or in front of an OpenAI-compatible server.

The first SIGTERM or SIGINT starts a graceful shutdown (INFERQ_SHUTDOWN_GRACE_S for running
tasks, then release and unbind, a few seconds at most even when the daemon is unreachable); a
second one stops at once.

Design notes:
- Secrets never come from argv (``ps`` shows it to every local user): the worker token is
  INFERQ_WORKER_TOKEN or ``--token-file``, the upstream's key INFERQ_BACKEND_API_KEY or
  ``--backend-api-key-file``; a file, when given, wins over the variable. Files are read,
  never logged; one that others may read is allowed (a container's secret mount often is)
  but logged as a warning.
- Plain ``http://`` is refused to a host other than this one (127.0.0.0/8, ::1, localhost),
  for the daemon always and for the upstream when an API key goes there, unless
  ``--insecure-http`` says the network is trusted: bearer tokens would travel in clear.
- With ``--backend URL`` the worker binds only once the upstream answers ``GET /models``,
  and pauses (unbinds) while it is down; see ``inferq.worker.backends``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from inferq.runtime import freeze_startup_heap, run
from inferq.worker.backends import EchoBackend, OpenAIBackend
from inferq.worker.client import WorkerClient
from inferq.worker.errors import AuthenticationError, UnavailableError, WorkerApiError
from inferq.worker.runner import Worker

if TYPE_CHECKING:
    from pydantic import SecretStr

    from inferq.settings import Settings

log = structlog.get_logger("inferq.worker")


class ConfigError(Exception):
    """The command line or the environment cannot start a worker; the message says why."""


def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run until signalled; 0 after a clean shutdown, 2 for a bad configuration or when the
    daemon refuses the token, 1 on any other daemon error. An unreachable daemon is waited
    for, with warnings."""
    try:
        token = _secret(args.token_file, "--token-file", settings.worker_token)
        if token is None:
            raise ConfigError("no worker token: set INFERQ_WORKER_TOKEN or pass --token-file")
        api_key = _secret(
            args.backend_api_key_file, "--backend-api-key-file", settings.backend_api_key
        )
        if args.capacity < 1:
            raise ConfigError("--capacity must be at least 1")
        _check_plain_http(args.url, "--url", args.insecure_http)
        if args.backend != "echo" and api_key is not None:
            _check_plain_http(args.backend, "--backend", args.insecure_http)
    except ConfigError as exc:
        print(f"inferq worker: {exc}", file=sys.stderr)
        return 2
    try:
        run(_serve(args, settings, token, api_key))
    except AuthenticationError as exc:
        print(f"inferq worker: the daemon refused the token: {exc.message}", file=sys.stderr)
        return 2
    except (UnavailableError, WorkerApiError) as exc:
        print(f"inferq worker: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 130
    return 0


async def _serve(
    args: argparse.Namespace, settings: Settings, token: str, api_key: str | None
) -> None:
    if args.backend == "echo":
        backend: EchoBackend | OpenAIBackend = EchoBackend(delay_s=args.echo_delay)
        check = None
    else:
        backend = OpenAIBackend(
            args.backend,
            api_key=api_key,
            timeout_s=args.backend_timeout,
            capacity=args.capacity,
            max_response_bytes=settings.backend_max_response_bytes,
            max_line_bytes=settings.backend_max_line_bytes,
        )
        check = backend.check
    max_response = settings.worker_max_response_bytes or (
        max(16, args.capacity + 1) * settings.max_body_bytes
    )
    async with WorkerClient(args.url, token, max_response_bytes=max_response) as client:
        worker = Worker(
            client,
            args.pool,
            backend,
            capacity=args.capacity,
            name=args.name,
            grace_s=settings.shutdown_grace_s,
            backend_check=check,
        )
        _install_signals(worker)
        freeze_startup_heap()
        log.info(
            "worker_started",
            url=_without_userinfo(args.url),
            pools=args.pool,
            capacity=args.capacity,
            backend=args.backend if args.backend == "echo" else _without_userinfo(args.backend),
        )
        try:
            await worker.run()
        finally:
            await backend.aclose()
            log.info("worker_stopped")


def _secret(path: str | None, flag: str, from_env: SecretStr | None) -> str | None:
    """The secret in the file at ``path`` (stripped), else the environment's, else None."""
    if path is None:
        return from_env.get_secret_value() if from_env is not None else None
    try:
        mode = Path(path).stat().st_mode
        value = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"cannot read {flag} {path}: {reason}") from None
    if not value:
        raise ConfigError(f"{flag} {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret_file_shared", path=path, mode=oct(mode & 0o777), expected="0600")
    return value


def _check_plain_http(url: str, flag: str, insecure: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag} must be an http:// or https:// URL")
    if parts.scheme == "https" or insecure or _is_loopback(parts.hostname):
        return
    raise ConfigError(
        f"{flag} is plain http:// to {parts.hostname}, another host: the token would travel "
        "in clear. Use https://, or pass --insecure-http if this network is trusted"
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


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
