"""Settings(BaseSettings): every knob of a replica, read from INFERQ_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """~/.local/share/inferq; as root /var/lib/inferq, because the embedded PostgreSQL then
    runs as `nobody`, which cannot traverse /root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/inferq")
    return Path.home() / ".local" / "share" / "inferq"


class Settings(BaseSettings):
    """Configuration of one inferq process. Each field is ``INFERQ_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    # Database. With no database_url, `inferq serve` starts a private PostgreSQL in data_dir.
    database_url: str | None = None
    # LISTEN needs a session-pooled connection: set this when database_url goes via PgBouncer.
    listen_database_url: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=16, ge=1)
    # PgBouncer before 1.21 in transaction mode cannot hold prepared statements.
    prepared_statements: bool = True
    statement_timeout_ms: int = Field(default=30_000, ge=0)
    # How long waits and streams retry reads while the database is unavailable (a restart, a
    # failover) before they give up with an error.
    db_retry_s: float = Field(default=10.0, ge=0)
    # A pooled connection idle for longer than this is checked (one empty query) before it is
    # handed out; busier ones are not (a request's own retry covers them).
    pool_check_idle_s: float = Field(default=1.0, ge=0)

    # HTTP. Request heads are bounded before any application code runs (inferq.http_protocol).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # request line + headers: 431
    header_timeout_s: float = Field(default=10.0, gt=0)  # a whole head, else 408 and close
    body_timeout_s: float = Field(default=10.0, gt=0)  # longest silence inside a body
    max_connections: int = Field(default=4096, ge=1)  # open connections per replica

    # /metrics: queue figures read at most once per interval, whatever the scrape rate; a
    # bearer token to require, and/or a port of its own (then the API port has no /metrics).
    metrics_interval_s: float = Field(default=5.0, ge=0)
    metrics_token: SecretStr | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # Logs.
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Worker (`inferq worker`). Its secrets come from here or from files, never from argv.
    worker_token: SecretStr | None = None
    backend_api_key: SecretStr | None = None
    # The largest daemon answer it reads; unset: (capacity + 1) x max_body_bytes, at least 16x
    # (a claim carries whole task requests).
    worker_max_response_bytes: int | None = Field(default=None, ge=1024)
    # The largest upstream answer, and the longest line of an upstream stream, it reads.
    backend_max_response_bytes: int = Field(default=16 << 20, ge=1024)
    backend_max_line_bytes: int = Field(default=1 << 20, ge=1024)

    # Wakeups.
    poll_only: bool = False  # no LISTEN at all: waiters rely on the safety poll
    # Revoked tokens are looked for this often, whatever the mode (a notification is faster,
    # but none comes in poll-only mode or while the listener is away).
    revocation_poll_s: float = Field(default=0.5, gt=0)
    safety_poll_s: float = Field(default=5.0, gt=0)
    listener_ping_s: float = Field(default=10.0, gt=0)
    wake_batch_ms: float = Field(default=1.0, ge=0)
    chunk_flush_ms: float = Field(default=10.0, ge=0)

    # Leases and sessions (database time).
    lease_s: float = Field(default=30.0, gt=0)
    # A claimed task's first lease: the worker must acknowledge it (start, heartbeat, outcome)
    # within this long, or it goes back to the queue (the rescuer runs at least this often / 2).
    claim_ack_s: float = Field(default=5.0, gt=0)
    session_ttl_s: float = Field(default=30.0, gt=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)

    # Scheduling (README, "Lanes and fair share"). A pending task that has waited aging_s is
    # claimed before every lane and priority, oldest first. An owner's recent use, which sets
    # its share of a lane, halves every fair_share_half_life_s.
    aging_s: float = Field(default=300.0, gt=0)
    fair_share_half_life_s: float = Field(default=60.0, gt=0)

    # Maintenance.
    maintenance_interval_s: float = Field(default=5.0, gt=0)
    pending_timeout_s: float = Field(default=3600.0, gt=0)
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    chunk_retention_s: float = Field(default=300.0, ge=0)

    # Files and batches (OpenAI's limits by default).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_batch_requests: int = Field(default=50_000, ge=1)
    file_part_bytes: int = Field(default=1 << 20, ge=1024)
    # An upload that has not finished after this long was abandoned: its parts are removed.
    upload_timeout_s: float = Field(default=3600.0, gt=0)
    batch_interval_s: float = Field(default=1.0, gt=0)

    # The dashboard (/dashboard): how long a browser's login lasts, and how often the
    # maintenance leader samples the queue into inferq.queue_minute (the pages' charts).
    dashboard_session_s: float = Field(default=8 * 3600.0, gt=0)
    dashboard_rollup_s: float = Field(default=10.0, gt=0)

    # Limits.
    # What one request may ask a worker for, unless its model's registry entry says otherwise:
    # `max_tokens` / `max_completion_tokens`, and `n` / `best_of` (inferq.services.caps).
    max_tokens: int = Field(default=32_768, ge=1)
    max_n: int = Field(default=16, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_json_depth: int = Field(default=64, ge=2)
    max_waits_per_token: int = Field(default=1000, ge=1)
    max_pending_per_token: int = Field(default=10_000, ge=1)
    # A token's tasks that ended cancelled or failed in the last hour, unless its quota sets
    # discarded_per_hour (sql/0009_discards.sql): past it, submits are 429. 0: no limit.
    max_discarded_per_hour: int = Field(default=10_000, ge=0)
    # How long a replica trusts what it read of a token's quota (inferq.services.quotas).
    quota_refresh_s: float = Field(default=5.0, ge=0)
    max_wait_s: float = Field(default=600.0, gt=0)
    # A sync or streaming OpenAI call whose pool no live worker serves fails after this long
    # (503 no_worker_available) instead of waiting INFERQ_MAX_WAIT_S; native tasks wait.
    no_worker_wait_s: float = Field(default=10.0, ge=0)
    sse_heartbeat_s: float = Field(default=15.0, gt=0)
    cancel_on_disconnect: bool = True
    # A drain (SIGTERM) lets open waits and streams finish for this long, then ends them with
    # 503 (streams: a retryable error frame). New work is refused from the start.
    drain_grace_s: float = Field(default=30.0, ge=0)
    # The worker's: on SIGTERM, how long running tasks get to finish before they are released.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # After SIGTERM, how long /readyz is red (and new work refused) before the listening
    # socket closes, so a load balancer stops routing here first.
    drain_delay_s: float = Field(default=1.0, ge=0)
