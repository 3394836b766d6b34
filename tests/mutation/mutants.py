"""The mutants: small, meaningful breakages of inferq that the test suite must catch.

Each mutant is one or more exact text edits (the pattern must occur exactly once in its file,
see ``tests.mutation.run``) and the tests that must fail under it. When the code moves, update
the pattern here: the run fails loudly on a pattern that no longer matches, it never skips it.
A mutant names the smallest set of tests that kills it, so the whole run stays within CI's
budget (15 minutes on a 2-core machine); prefer integration tests to e2e ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Edit:
    path: str  # relative to the repository root
    find: str
    replace: str


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    why: str  # what a user would suffer
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    timeout_s: float = 60.0


TASKS = "src/inferq/db/task_queries.py"
REPOSITORY = "src/inferq/db/tasks.py"
SESSIONS = "src/inferq/db/sessions.py"
TRIGGERS = "sql/0002_triggers.sql"
REPO_TESTS = "tests/integration/test_task_repository.py"
CLAIM_TESTS = "tests/integration/test_claim.py"
CANCEL_TESTS = "tests/integration/test_api_openai_cancel.py"
PROTOCOL = "src/inferq/http_protocol.py"
HARDENING = "tests/e2e/test_serve_hardening.py"
EMBEDDED = "tests/e2e/test_serve_embedded.py"
METRICS_TESTS = "tests/integration/test_metrics.py"
REVOCATION_TESTS = "tests/integration/test_revocation.py"
DASHBOARD = "src/inferq/services/dashboard.py"
DASHBOARD_ROUTES = "src/inferq/api/dashboard.py"
DASHBOARD_TESTS = "tests/integration/test_dashboard.py"
BROWSER_TESTS = "tests/browser/test_dashboard_browser.py"
FAIR_TESTS = "tests/integration/test_fair_share.py"
LANE_TESTS = "tests/integration/test_lanes.py"
QUOTAS = "src/inferq/db/quotas.py"
QUOTA_SQL = "sql/0007_quotas.sql"
DISCARD_SQL = "sql/0009_discards.sql"
DISCARD_TESTS = "tests/integration/test_discards.py"
QUOTA_TESTS = "tests/integration/test_quotas.py"
USAGE_TESTS = "tests/integration/test_usage.py"


def _one(path: str, find: str, replace: str) -> tuple[Edit, ...]:
    return (Edit(path, find, replace),)


MUTANTS: tuple[Mutant, ...] = (
    # -- the claim ----------------------------------------------------------------------------
    Mutant(
        "claim_ignores_priority",
        "a priority 10 task waits behind older priority 0 work",
        _one(TASKS, "            ORDER BY q.priority DESC, q.created_at, q.id\n",
             "            ORDER BY q.created_at, q.id\n"),
        (f"{CLAIM_TESTS}::test_claim_takes_priority_then_fifo_and_only_requested_pools",),
    ),
    Mutant(
        "claim_without_skip_locked",
        "claimers queue behind each other's row locks instead of taking other rows",
        _one(TASKS, "            LIMIT (SELECT n FROM wanted)\n            FOR UPDATE SKIP LOCKED\n         ) h",
             "            LIMIT (SELECT n FROM wanted)\n            FOR UPDATE\n         ) h"),
        (f"{CLAIM_TESTS}::test_a_claim_skips_a_locked_row_instead_of_waiting_for_it",),
        timeout_s=30.0,
    ),
    Mutant(
        "expired_session_claims",
        "a worker whose session expired (its tasks already reverted) keeps taking work",
        _one(TASKS, "SELECT CASE WHEN s.expires_at > now() THEN", "SELECT CASE WHEN true THEN"),
        (f"{CLAIM_TESTS}::test_a_bound_claim_needs_a_live_session_row",),
    ),
    Mutant(
        "claim_past_capacity",
        "a worker of capacity 2 is handed a third task",
        _one(TASKS, "greatest(0, s.capacity - (", "greatest(0, s.capacity + 1 - ("),
        (f"{CLAIM_TESTS}::test_a_session_never_claims_past_its_capacity",),
    ),
    # -- the state machine --------------------------------------------------------------------
    Mutant(
        "transition_running_to_claimed",
        "a running task can be pushed back to claimed, in both the trigger and the Python table",
        (
            Edit(TRIGGERS, "WHEN 'running' THEN new_status IN ('completed',",
                 "WHEN 'running' THEN new_status IN ('claimed', 'completed',"),
            Edit("src/inferq/domain/task.py",
                 "{TaskStatus.COMPLETED, TaskStatus.ERROR, TaskStatus.CANCELLED, TaskStatus.PENDING}",
                 "{TaskStatus.CLAIMED, TaskStatus.COMPLETED, TaskStatus.ERROR, "
                 "TaskStatus.CANCELLED, TaskStatus.PENDING}"),
        ),
        ("tests/integration/test_transitions.py",),
    ),
    # -- attempt fencing and leases -----------------------------------------------------------
    Mutant(
        "complete_ignores_attempt",
        "a stale worker's late result overwrites the answer of the attempt that holds the task",
        _one(TASKS, '_HOLDS = sql.SQL("t.id = %(id)s AND t.claimed_by = %(session)s AND '
             't.attempt = %(attempt)s")',
             '_HOLDS = sql.SQL("t.id = %(id)s AND t.claimed_by = %(session)s")'),
        (f"{REPO_TESTS}::test_stale_attempt_is_rejected_for_complete_fail_and_chunks",),
    ),
    Mutant(
        "heartbeat_keeps_old_leases",
        "a heartbeating worker still loses its running tasks when the first lease runs out",
        _one(SESSIONS,
             "UPDATE inferq.task t SET lease_expires_at = now() + make_interval(secs => "
             "%(lease_s)s)\n    FROM sess",
             "UPDATE inferq.task t SET lease_expires_at = t.lease_expires_at\n    FROM sess"),
        ("tests/integration/test_leases.py",),
    ),
    Mutant(
        "lost_one_attempt_too_many",
        "a task lost max_attempts times is queued once more instead of ending in error",
        _one(TASKS, "t.attempt - t.releases >= t.max_attempts", "t.attempt - t.releases > t.max_attempts"),
        ("tests/integration/test_maintenance.py::test_rescuer_fails_a_task_after_max_attempts_with_a_message",),
    ),
    Mutant(
        "rescuer_takes_live_leases",
        "a task running on a healthy worker is taken away and run a second time",
        _one(TASKS, "  AND t.lease_expires_at < coalesce(%(now)s::timestamptz, now())\n",
             "  AND t.lease_expires_at < coalesce(%(now)s::timestamptz, now()) + interval '1 hour'\n"),
        (f"{REPO_TESTS}::test_revert_expired_uses_the_clock_and_ends_in_error_after_max_attempts",),
    ),
    Mutant(
        "release_uses_up_an_attempt",
        "a worker's graceful shutdown counts against the task's max_attempts",
        _one(TASKS, "releases = t.releases + CASE WHEN %(graceful)s::boolean THEN 1 ELSE 0 END",
             "releases = t.releases"),
        (f"{REPO_TESTS}::test_a_graceful_release_does_not_use_up_an_attempt",),
    ),
    Mutant(
        "reaper_reaps_live_sessions",
        "a worker that heartbeats on time has its session deleted and its tasks reverted",
        _one(SESSIONS, "    WHERE expires_at < coalesce(%(now)s::timestamptz, now())\n",
             "    WHERE expires_at < coalesce(%(now)s::timestamptz, now()) + interval '1 hour'\n"),
        ("tests/integration/test_maintenance.py::test_reaper_reverts_the_tasks_of_a_dead_session",),
    ),
    Mutant(
        "stale_chunks_stored",
        "a worker that lost its lease still streams its chunks into the new attempt's readers",
        _one("src/inferq/db/chunks.py", "        AND t.attempt = c.attempt AND t.status IN ('claimed', 'running')",
             "        AND t.status IN ('claimed', 'running')"),
        ("tests/integration/test_relay.py::test_a_stale_attempt_gets_lease_lost_and_others_still_land",),
    ),
    # -- owner scoping ------------------------------------------------------------------------
    Mutant(
        "cancel_ignores_owner",
        "any client can cancel another owner's task by id",
        _one(TASKS, "WHERE t.id = %(id)s AND t.owner_id = %(owner)s AND t.status IN",
             "WHERE t.id = %(id)s AND t.status IN"),
        ("tests/integration/test_api_bad_input.py",),
    ),
    Mutant(
        "get_ignores_owner",
        "a client reads another owner's prompt and answer by id",
        _one(TASKS, 'GET_OWNED = render(_GET + sql.SQL(" AND t.owner_id = %(owner)s"))',
             "GET_OWNED = render(_GET)"),
        (f"{REPO_TESTS}::test_another_owner_sees_nothing",),
    ),
    # -- maintenance --------------------------------------------------------------------------
    Mutant(
        "gc_deletes_recent_rows",
        "finished tasks are deleted long before INFERQ_RETENTION_S",
        _one(TASKS, "                       - make_interval(secs => %(retention_s)s)",
             "                       + make_interval(secs => %(retention_s)s)"),
        (f"{REPO_TESTS}::test_gc_with_a_fixed_clock",),
    ),
    Mutant(
        "gc_never_expires_pending",
        "a task no worker serves stays pending forever instead of failing after the timeout",
        _one(TASKS, "now()) - make_interval(secs => %(timeout_s)s)",
             "now()) - make_interval(secs => %(timeout_s)s) * 1000"),
        (f"{REPO_TESTS}::test_gc_with_a_fixed_clock",),
    ),
    # -- idempotency --------------------------------------------------------------------------
    Mutant(
        "idempotency_ignores_the_request",
        "a reused Idempotency-Key with a different request silently returns the old task",
        _one(REPOSITORY, "                if not same:\n", "                if False:\n"),
        (f"{REPO_TESTS}::test_enqueue_with_the_same_idempotency_key_returns_the_first_task",),
    ),
    # -- notifications and wakeups ------------------------------------------------------------
    Mutant(
        "listener_skips_resync",
        "a waiter whose notification was sent while the listener reconnected waits for the poll",
        _one("src/inferq/db/listener.py", "            self.hub.resync_all()\n", ""),
        ("tests/integration/test_listener.py::test_lost_notifications_are_recovered_by_reconnect_and_resync",),
    ),
    Mutant(
        "no_notify_on_completion",
        "a client waiting on a running task learns it finished only at the next safety poll",
        _one(TRIGGERS, "            WHERE n.status IS DISTINCT FROM o.status\n",
             "            WHERE n.status IS DISTINCT FROM o.status AND o.status <> 'running'\n"),
        ("tests/integration/test_notify.py::test_one_notification_per_status_change_with_the_documented_payload",),
    ),
    # -- streams ------------------------------------------------------------------------------
    Mutant(
        "stream_skips_a_gap",
        "a reader delivers chunk 3 before chunk 2 when another replica's flush lags",
        _one("src/inferq/services/waits.py", "if chunk[0] != last_seq + 1:", "if chunk[0] <= last_seq:"),
        ("tests/integration/test_service.py::test_a_reader_holds_a_chunk_back_until_the_gap_before_it_is_filled",
         "tests/integration/test_service.py::test_chunks_posted_alternately_through_two_replicas_reach_a_third_in_order"),
    ),
    Mutant(
        "resume_ignores_last_event_id",
        "a resumed stream replays every chunk from the start",
        _one("src/inferq/services/waits.py",
             "attempt, last_seq = after if after is not None else (_live_attempt(task), 0)",
             "attempt, last_seq = (_live_attempt(task), 0)"),
        ("tests/integration/test_service.py::test_events_resume_after_a_seq_for_a_finished_task",),
    ),
    # -- drain --------------------------------------------------------------------------------
    Mutant(
        "drain_accepts_new_work",
        "a replica shutting down still accepts submits that it will not see through",
        _one("src/inferq/services/drain.py",
             "        if self.draining:\n            raise ShuttingDown",
             "        if False:\n            raise ShuttingDown"),
        ("tests/integration/test_api_ops.py::test_drain_turns_ready_red_and_ends_waits_and_streams",),
    ),
    # -- the OpenAI routes --------------------------------------------------------------------
    Mutant(
        "openai_disconnect_keeps_task",
        "a client that hung up still has its generation run on a GPU",
        _one("src/inferq/services/completions.py",
             "cut it.\"\"\"\n        if not self.service.drain.draining:",
             "cut it.\"\"\"\n        if False:"),
        (f"{CANCEL_TESTS}::test_a_client_that_leaves_a_sync_call",),
    ),
    Mutant(
        "sync_timeout_keeps_task",
        "a sync call answered 504 leaves its task queued, to run for nobody",
        _one("src/inferq/services/completions.py",
             "            if not isinstance(exc, TaskFailed | TaskCancelled | TaskNotFound):\n"
             "                await call.abandon()",
             "            if False:\n                await call.abandon()"),
        (f"{CANCEL_TESTS}::test_a_sync_call_past_max_wait_is_504_and_its_task_is_cancelled",),
    ),
    Mutant(
        "stream_skips_worker_lost",
        "a stream whose worker died after some chunks goes on silently with the retry's chunks",
        _one("src/inferq/api/sse.py", "            if relayed:\n                yield openai_error_frame(",
             "            if False:\n                yield openai_error_frame("),
        (f"{CANCEL_TESTS}::test_a_stream_whose_worker_is_lost_after_chunks_ends_with_worker_lost",),
    ),
    Mutant(
        "ready_ignores_the_listener",
        "a replica that lost its LISTEN connection stays in the load balancer, its waits slow",
        _one("src/inferq/services/health.py",
             'checks["listener"] = "down" if listener is not None and not listener.healthy else "ok"',
             'checks["listener"] = "ok"'),
        ("tests/integration/test_api_ops.py::test_ready_is_red_and_listener_up_is_zero_while_the_listener_is_down",),
    ),
    Mutant(
        "keyed_call_cancelled",
        "a retry with the same Idempotency-Key finds its task cancelled and must start over",
        _one("src/inferq/services/completions.py", "        if not self.keyed:\n", "        if True:\n"),
        ("tests/integration/test_drain.py::test_a_keyed_sync_call_cut_by_a_drain_reattaches_on_another_replica",),
    ),
    Mutant(
        "drain_without_grace",
        "a rolling restart cuts every open call at once instead of letting it finish",
        _one("src/inferq/services/drain.py", "        grace = self.grace_s if grace_s is None else grace_s",
             "        grace = 0"),
        ("tests/integration/test_drain.py::test_a_drain_lets_a_sync_call_finish_within_its_grace",),
    ),
    Mutant(
        "disconnect_in_a_drain_cancels",
        "a balancer closing connections during a rolling restart throws generations away",
        _one("src/inferq/services/completions.py",
             "cut it.\"\"\"\n        if not self.service.drain.draining:",
             "cut it.\"\"\"\n        if True:"),
        ("tests/integration/test_drain.py::test_a_client_that_leaves_during_a_drain_does_not_cancel_its_task",),
    ),
    Mutant(
        "no_worker_waits_forever",
        "a call for a pool no worker serves hangs for INFERQ_MAX_WAIT_S",
        _one("src/inferq/services/completions.py",
             "        if task.status is TaskStatus.PENDING and not await self._served(task.pool_name):",
             "        if False:"),
        ("tests/integration/test_fail_fast.py::test_a_call_for_a_pool_no_worker_serves_fails_fast_and_cancels_its_task",),
    ),
    Mutant(
        "reads_not_retried",
        "a PostgreSQL restart ends every open wait and stream with an error",
        _one("src/inferq/services/waits.py", "give_up = loop.time() + self.settings.db_retry_s",
             "give_up = loop.time()"),
        (
            "tests/integration/test_db_restart.py::"
            "test_a_wait_that_meets_a_connection_killed_by_a_restart_retries_and_answers",
        ),
        timeout_s=120.0,
    ),
    Mutant(
        "heartbeat_calls_own_outcomes_lost",
        "a worker whose heartbeat races its own outcome drops the finished task and never logs it done",
        _one("src/inferq/db/sessions.py",
             "  AND NOT (t.status IN ('completed', 'error') AND t.claimed_by = %(id)s)\n", ""),
        ("tests/integration/test_leases.py::"
         "test_a_heartbeat_racing_the_workers_own_outcome_does_not_call_the_task_lost",),
    ),
    Mutant(
        "stream_ends_silently",
        "a stream whose server side failed just stops; the openai client returns a partial answer",
        _one("src/inferq/api/sse.py", "                        await self._send(send, self.error_frame)\n", ""),
        ("tests/unit/test_sse.py",),
    ),
    Mutant(
        "claims_need_no_ack",
        "a frozen worker's claimed tasks wait out a whole lease before another worker gets them",
        _one("src/inferq/services/claims.py", "        self._ack_s = min(settings.claim_ack_s, settings.lease_s)",
             "        self._ack_s = settings.lease_s"),
        ("tests/integration/test_claim_ack.py::test_only_the_acknowledged_claims_survive_their_first_lease",),
    ),
    Mutant(
        "start_does_not_acknowledge",
        "a streaming task is taken from its worker a few seconds into the generation",
        _one(TASKS, "    lease_expires_at = coalesce(now() + make_interval(secs => %(lease_s)s), t.lease_expires_at)",
             "    lease_expires_at = t.lease_expires_at"),
        ("tests/integration/test_claim_ack.py::test_only_the_acknowledged_claims_survive_their_first_lease",),
    ),
    # -- the worker SDK -----------------------------------------------------------------------
    Mutant(
        "outcome_batch_unbounded",
        "a busy worker posts thousands of outcomes in one call, past the daemon's body limit",
        _one("src/inferq/worker/outcomes.py", "if batch and (len(batch) == self.max_items or ",
             "if batch and (False or "),
        ("tests/integration/test_worker_sdk.py::test_a_call_carries_at_most_256_outcomes_with_at_most_four_calls_in_flight",),
    ),
    Mutant(
        "worker_never_acknowledges",
        "every long unstreamed generation is taken from its worker and run again",
        _one("src/inferq/worker/runner.py", "            self._ack_due.set()  # a streaming task is acknowledged by its start",
             "            pass"),
        ("tests/integration/test_claim_ack.py::test_the_sdk_acknowledges_a_long_unstreamed_task_in_time",),
    ),
    Mutant(
        "failure_cancels_start",
        "a streamed task whose upstream refuses at once gets no outcome: its lease runs out 3x",
        _one("src/inferq/worker/stream.py", "            await asyncio.shield(gate)", "            await gate"),
        ("tests/unit/test_worker_runner.py::test_a_handler_that_fails_before_its_start_is_answered_still_fails_the_task",),
    ),
    # -- security (issue #14) -------------------------------------------------------------------
    Mutant(
        "http_heads_unbounded",
        "8 unauthenticated connections with unfinished huge headers take the replica's memory",
        _one("src/inferq/daemon.py", '"http": BoundedHttpToolsProtocol.with_limits(limits or HttpLimits()),',
             '"http": "httptools",'),
        (f"{HARDENING}::test_unfinished_huge_headers_leave_memory_flat_and_healthz_answering",),
    ),
    Mutant(
        "complete_head_not_measured",
        "a head over the limit that arrives in one read reaches the application",
        _one(PROTOCOL, "            raise _HeadTooLarge()\n", "            pass\n"),
        (f"{HARDENING}::test_an_oversized_complete_head_is_431_and_one_under_the_limit_is_served",),
    ),
    Mutant(
        "no_head_timeout",
        "a connection that never sends a head (or trickles it) stays open for ever",
        _one(PROTOCOL, "self._bounds.head_timer = self.loop.call_later(limits.head_timeout_s, self._head_timed_out)",
             "self._bounds.head_timer = None"),
        (f"{HARDENING}::test_a_slow_head_a_silent_connection_and_a_stalled_body_are_closed",),
    ),
    Mutant(
        "no_connection_cap",
        "connections past INFERQ_MAX_CONNECTIONS are accepted and kept",
        _one(PROTOCOL, "if len(self.connections) > limits.max_connections:", "if False:"),
        (f"{HARDENING}::test_connections_past_the_cap_are_refused_with_503",),
    ),
    Mutant(
        "embedded_database_trusts_tcp",
        "any local user logs in to the embedded PostgreSQL over TCP as superuser",
        _one("src/inferq/db/cluster.py", "host    all   all   127.0.0.1/32  scram-sha-256",
             "host    all   all   127.0.0.1/32  trust"),
        (f"{EMBEDDED}::test_the_embedded_database_admits_no_one_without_its_password",),
    ),
    Mutant(
        "admin_token_printed",
        "the admin token lands in journald or the container logs",
        _one("src/inferq/embedded.py", '        write_secret_file(token_file, secret + "\\n")\n',
             '        write_secret_file(token_file, secret + "\\n")\n        print(secret)\n'),
        (f"{EMBEDDED}::test_serve_without_database_url",),
    ),
    Mutant(
        "secret_file_chmod_later",
        "a secret file is world-readable between its creation and a chmod",
        _one("src/inferq/embedded.py", "fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)",
             "fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.chmod(path, 0o600)"),
        (f"{EMBEDDED}::test_secret_files_are_0600_from_their_first_byte",),
    ),
    Mutant(
        "metrics_read_every_scrape",
        "every scrape runs a GROUP BY over the whole task table",
        _one("src/inferq/services/health.py", "if read_at is not None and self.clock() - read_at < self.interval_s:",
             "if False:"),
        (f"{METRICS_TESTS}::test_a_burst_of_scrapes_reads_the_queue_once_per_interval",),
    ),
    Mutant(
        "metrics_token_ignored",
        "INFERQ_METRICS_TOKEN is set, and /metrics answers anyone",
        _one("src/inferq/services/health.py", "        if self._token is None:\n            return\n",
             "        if True:\n            return\n"),
        (f"{METRICS_TESTS}::test_a_metrics_token_is_required_when_set",),
    ),
    Mutant(
        "caps_not_checked",
        "a request asks a worker for a million tokens or a thousand generations",
        _one("src/inferq/services/tasks.py",
             "        check_request(submission.request_body, llm, self.settings)  # 400 above a cap\n", ""),
        ("tests/integration/test_caps.py::test_caps_on_both_openai_routes_and_the_native_submit",),
    ),
    Mutant(
        "model_caps_ignored",
        "a model's own caps in the registry are ignored: the server's defaults apply",
        _one("src/inferq/services/caps.py", "cap: int = getattr(llm, cap_name, None) or getattr(settings, cap_name)",
             "cap: int = getattr(settings, cap_name)"),
        ("tests/integration/test_caps.py::test_a_models_own_caps_from_the_registry",),
    ),
    Mutant(
        "database_text_to_clients",
        "a client reads `value for domain inferq.pool_name violates check constraint ...`",
        _one("src/inferq/db/errors.py", "return InvalidValue(message, param=field or None)",
             "return InvalidValue(str(exc), param=field or None)"),
        ("tests/integration/test_error_text.py::test_no_error_body_carries_database_text",),
    ),
    Mutant(
        "no_revocation_poll",
        "in poll-only mode a revoked token keeps working for its cache life (30 s)",
        _one("src/inferq/daemon.py", "        self.revocations.start()\n", ""),
        (f"{REVOCATION_TESTS}::test_a_revocation_takes_effect_within_a_second[poll_only]",),
    ),
    Mutant(
        "lookup_resurrects_revoked_token",
        "a lookup that read the row just before the revocation caches the token again",
        _one("src/inferq/services/auth.py", "if self.revocations != revocations:", "if False:"),
        (f"{REVOCATION_TESTS}::test_a_lookup_in_flight_cannot_resurrect_a_revoked_token",),
    ),
    Mutant(
        "revoked_waits_go_on",
        "a revoked token's open waits, sync calls and long-polls carry on",
        _one("src/inferq/services/drain.py", "            wait.interrupt(REVOKED)\n", "            pass\n"),
        (f"{REVOCATION_TESTS}::test_open_waits_and_streams_of_a_revoked_token_end",),
    ),
    Mutant(
        "revoked_streams_go_on",
        "a revoked token's SSE streams keep relaying",
        _one("src/inferq/services/drain.py", "            event.set()\n\n    def revocation",
             "            pass\n\n    def revocation"),
        (f"{REVOCATION_TESTS}::test_open_waits_and_streams_of_a_revoked_token_end",),
        timeout_s=90.0,
    ),
    Mutant(
        "proxy_serves_metrics",
        "the public nginx listener serves /metrics to anyone",
        _one("deploy/nginx/inferq.conf", "    location = /metrics {\n", "    location = /metrics-off {\n"),
        ("tests/e2e/test_proxy_tls.py::test_nginx_terminates_tls_and_redirects_plain_http",),
    ),
    Mutant(
        "compose_database_as_root",
        "a compose service runs as root",
        _one("docker-compose.yml", 'user: "999:999"', 'user: "0:0"'),
        ("tests/unit/test_deploy_files.py::test_no_compose_service_runs_as_root",),
    ),
    # -- failover and autoscaling (#18) ------------------------------------------------------
    Mutant(
        "pool_reconnects_on_psycopg_backoff",
        "after a failover of a few seconds a replica answers 503 for as long again, waiting for its pool's next try",
        _one("src/inferq/db/pool.py", "        reconnect_timeout=RECONNECT_SERIES_S,\n", ""),
        ("tests/integration/test_pool_reconnect.py::test_a_broken_connection_gives_up_its_slot_while_the_database_is_down",
         "tests/integration/test_pool_reconnect.py::test_the_pool_is_back_soon_after_a_long_outage"),
    ),
    Mutant(
        "oldest_pending_age_is_the_newest",
        "a pool whose queue has stalled for an hour shows a wait of seconds; no alert, no scale-out",
        _one("src/inferq/db/stats.py", "now() - min(created_at)", "now() - max(created_at)"),
        ("tests/integration/test_queue_metrics.py",),
    ),
    # -- the dashboard (#17) -----------------------------------------------------------------
    Mutant(
        "dashboard_csrf_unchecked",
        "any site the admin visits can cancel tasks and revoke tokens through the admin's browser",
        _one(DASHBOARD, "        if not csrf or not hmac.compare_digest(csrf.encode(), login.csrf.encode()):\n",
             "        if False:\n"),
        (f"{DASHBOARD_TESTS}::test_state_changes_without_the_csrf_token_are_refused",),
    ),
    Mutant(
        "dashboard_cookie_not_httponly",
        "a script injected into any page can read the admin's session cookie",
        _one(DASHBOARD_ROUTES, '        httponly=True,\n        samesite="strict",\n        secure=',
             '        httponly=False,\n        samesite="strict",\n        secure='),
        (f"{DASHBOARD_TESTS}::test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session",
         f"{BROWSER_TESTS}::test_login_keeps_the_token_out_of_the_browser"),
        timeout_s=120.0,
    ),
    Mutant(
        "dashboard_cookie_samesite_lax",
        "a link from another site arrives with the admin's session",
        _one(DASHBOARD_ROUTES, '        samesite="strict",\n        secure=', '        samesite="lax",\n        secure='),
        (f"{DASHBOARD_TESTS}::test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session",),
    ),
    Mutant(
        "dashboard_login_for_any_token",
        "a client token opens the dashboard and cancels everyone's tasks",
        _one(DASHBOARD, 'token = await ADMIN.authorize(self.auth, f"Bearer {secret.strip()}")',
             'token = await self.auth.authenticate(f"Bearer {secret.strip()}")'),
        (f"{DASHBOARD_TESTS}::test_non_admin_tokens_and_bad_tokens_are_refused",),
    ),
    Mutant(
        "dashboard_session_outlives_its_token",
        "a revoked admin token's browser sessions keep working for hours",
        _one("src/inferq/db/dashboard.py", "  AND k.revoked_at IS NULL AND k.role = 'admin'\n", "  AND k.role = 'admin'\n"),
        (f"{DASHBOARD_TESTS}::test_revoking_a_token_from_the_dashboard_refuses_it_and_ends_its_sessions",),
    ),
    Mutant(
        "dashboard_feed_ignores_sessions",
        "a dead worker stays on the Workers page until the next periodic refresh",
        _one("src/inferq/services/feed.py", '    "sessions": frozenset({"overview", "workers"}),\n',
             '    "sessions": frozenset({"overview"}),\n'),
        (f"{BROWSER_TESTS}::test_a_worker_disappears_when_it_is_killed",),
        timeout_s=120.0,
    ),
    Mutant(
        "docs_from_a_cdn",
        "/docs is blank on a machine without internet",
        _one("src/inferq/api/app.py", 'swagger_js_url="/docs/assets/swagger-ui-bundle.js",',
             'swagger_js_url="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js",'),
        (f"{DASHBOARD_TESTS}::test_docs_are_served_from_the_package",),
    ),
    # -- scheduling: lanes, fair share, aging (#15) ---------------------------------------------
    Mutant(
        "fair_share_serves_owners_in_name_order",
        "one owner's backlog holds back every owner whose name sorts after it",
        _one(TASKS, "ORDER BY ({decayed}) / f.weight, f.owner_id", "ORDER BY f.owner_id"),
        (f"{FAIR_TESTS}::test_claims_follow_the_weights_and_serve_an_idle_owner_at_once",),
    ),
    Mutant(
        "fair_share_ignores_weights",
        "a team given weight 3 gets no more of the GPUs than a team with weight 1",
        _one(TASKS, "ORDER BY ({decayed}) / f.weight, f.owner_id", "ORDER BY ({decayed}), f.owner_id"),
        (f"{FAIR_TESTS}::test_claims_follow_the_weights_and_serve_an_idle_owner_at_once",),
    ),
    Mutant(
        "fair_share_never_counts_use",
        "the claim never records what an owner used: the first owner by name takes everything",
        _one(TASKS, "SET usage = ({decayed}) + s.n, usage_at = now()", "SET usage = 0"),
        (f"{FAIR_TESTS}::test_claims_follow_the_weights_and_serve_an_idle_owner_at_once",),
    ),
    Mutant(
        "lanes_served_batch_first",
        "an interactive request waits behind a whole batch backlog",
        _one("src/inferq/domain/lanes.py", 'LANES: tuple[Lane, ...] = ("interactive", "default", "batch")',
             'LANES: tuple[Lane, ...] = ("batch", "default", "interactive")'),
        (f"{LANE_TESTS}::test_an_interactive_task_behind_1000_batch_tasks_is_claimed_next",),
    ),
    Mutant(
        "aging_never_applies",
        "a batch task starves for as long as the lanes above it stay busy",
        _one(TASKS, "AND q.created_at < now() - make_interval(secs => %(aging_s)s)",
             "AND q.created_at < now() - make_interval(secs => %(aging_s)s) * 1000"),
        (f"{FAIR_TESTS}::test_an_aged_batch_task_goes_before_a_saturated_interactive_lane",),
    ),
    Mutant(
        "lane_permission_not_checked",
        "any client token can jump the queue with lane interactive and priority 1000",
        _one("src/inferq/services/tasks.py", "        if refusal is not None:\n            raise Forbidden(refusal)",
             "        if refusal is not None and False:\n            raise Forbidden(refusal)"),
        (f"{LANE_TESTS}::test_a_lane_or_priority_the_token_may_not_use_is_403_naming_what_it_may",),
    ),
    Mutant(
        "priority_range_has_no_top",
        "a token limited to priorities 0 to 5 submits at priority 1000",
        _one("src/inferq/domain/lanes.py", "self.priority_min <= priority <= self.priority_max",
             "self.priority_min <= priority"),
        (f"{LANE_TESTS}::test_a_lane_or_priority_the_token_may_not_use_is_403_naming_what_it_may",),
    ),
    # -- quotas and usage (#15) ----------------------------------------------------------------
    Mutant(
        "rpm_counter_not_counted",
        "a token with 60 requests per minute gets all 200 of its burst: the shared counter never moves",
        _one(QUOTAS, "DO UPDATE SET requests = r.requests + 1", "DO UPDATE SET requests = r.requests"),
        (f"{QUOTA_TESTS}::test_requests_per_minute_hold_across_three_replicas",),
        timeout_s=120.0,
    ),
    Mutant(
        "max_running_ignored_at_claim",
        "an owner at its max running gets every task a worker has room for",
        _one(QUOTA_SQL, "    IF held >= cap THEN\n        RETURN NULL;",
             "    IF held >= cap THEN\n        RETURN NEW;"),
        (f"{QUOTA_TESTS}::test_max_running_holds_at_claim_time",),
    ),
    Mutant(
        "capped_owner_stalls_the_claim",
        "an owner at its max running blocks the queue head: the others' tasks wait behind hers",
        _one(TASKS, "decayed=_DECAYED, quota=RUNNING_CAP)", "decayed=_DECAYED, quota=sql.SQL(\"\"))"),
        (f"{QUOTA_TESTS}::test_a_capped_owner_does_not_stall_the_others",),
    ),
    Mutant(
        "usage_counted_per_attempt",
        "the usage counters count every attempt's answer: a lost attempt's late one, a repeat",
        _one("src/inferq/services/usage.py",
             "    return isinstance(result, Finished) and result.status is TaskStatus.COMPLETED and result.fresh\n",
             "    return True\n"),
        (f"{USAGE_TESTS}::test_usage_counts_the_completing_attempt_once",),
    ),
    Mutant(
        "quota_429_without_retry_after",
        "a client over its quota is told 429 but not when to come back, and retries at once",
        _one("src/inferq/api/errors.py",
             "        headers[\"Retry-After\"] = str(max(1, math.ceil(exc.retry_after_s)))\n",
             "        pass\n"),
        (f"{QUOTA_TESTS}::test_max_pending_refuses_until_a_task_is_claimed",),
    ),
    Mutant(
        "discards_never_counted",
        "submit-then-cancel grows the task table without bound: no cancel is ever counted",
        _one(DISCARD_SQL, "    IF discards THEN\n", "    IF false THEN\n"),
        (f"{DISCARD_TESTS}::test_cancelled_and_failed_tasks_count_against_the_hourly_limit",),
    ),
    Mutant(
        "failed_tasks_not_discards",
        "a client whose requests all fail at the worker creates rows without bound",
        _one(DISCARD_SQL,
             "        WHERE n.status IN ('cancelled', 'error') AND o.status",
             "        WHERE n.status IN ('cancelled') AND o.status"),
        (f"{DISCARD_TESTS}::test_cancelled_and_failed_tasks_count_against_the_hourly_limit",),
    ),
    Mutant(
        "completions_counted_as_discards",
        "a busy, healthy client is refused after 10,000 answered requests in an hour",
        (Edit(DISCARD_SQL,
              "bool_or(status IN ('cancelled', 'error') AND",
              "bool_or(status IN ('cancelled', 'error', 'completed') AND"),
         Edit(DISCARD_SQL,
              "        WHERE n.status IN ('cancelled', 'error') AND o.status",
              "        WHERE n.status IN ('cancelled', 'error', 'completed') AND o.status")),
        (f"{DISCARD_TESTS}::test_cancelled_and_failed_tasks_count_against_the_hourly_limit",),
    ),
    Mutant(
        "discard_window_never_rolls",
        "a token that hit its discard limit once is refused for ever",
        _one(DISCARD_SQL, "r.minute > now() - interval '1 hour'", "true"),
        (f"{DISCARD_TESTS}::test_a_tokens_own_limit_overrides_the_default_and_old_discards_age_out",),
    ),
    Mutant(
        "discard_limit_blocks_reattach",
        "a client over its discard limit cannot get back to the task it already has by its key",
        _one(REPOSITORY, "                if idempotency_key is None or await self._one(GET_BY_KEY, params) is None:",
             "                if True:"),
        (f"{DISCARD_TESTS}::test_cancelled_and_failed_tasks_count_against_the_hourly_limit",),
    ),
    Mutant(
        "token_discard_limit_ignored",
        "an admin raises a chat frontend's discard limit, and it is still refused at the default",
        _one(DISCARD_SQL, "cap := coalesce(cap, nullif(server_limit, 0));",
             "cap := nullif(server_limit, 0);"),
        (f"{DISCARD_TESTS}::test_a_tokens_own_limit_overrides_the_default_and_old_discards_age_out",),
    ),
)  # fmt: skip
