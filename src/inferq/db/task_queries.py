"""The SQL of TaskRepository: every task read, and every transition as one guarded statement."""

from __future__ import annotations

from psycopg import sql

from inferq.db.rows import TASK_SELECT, render

ENQUEUE = render(
    sql.SQL(
        """
INSERT INTO inferq.task AS t (pool_name, llm_name, model, tier, streaming, request_body,
                              owner_id, agent_id, priority, max_attempts, idempotency_key,
                              token_id)
VALUES (%(pool)s, %(llm)s, %(model)s, %(tier)s, %(streaming)s, %(body)s,
        %(owner)s, %(agent)s, %(priority)s, %(max_attempts)s, %(key)s,
        %(token)s)
ON CONFLICT (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

GET_BY_KEY = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t WHERE t.owner_id = %(owner)s AND t.idempotency_key = %(key)s
"""
    ).format(task_select=TASK_SELECT)
)

_GET = sql.SQL("SELECT {task_select} FROM inferq.task t WHERE t.id = %(id)s").format(
    task_select=TASK_SELECT
)
GET = render(_GET)
GET_OWNED = render(_GET + sql.SQL(" AND t.owner_id = %(owner)s"))
GET_MANY = render(
    sql.SQL("SELECT {task_select} FROM inferq.task t WHERE t.id = ANY(%(ids)s)").format(
        task_select=TASK_SELECT
    )
)

LIST = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
WHERE t.owner_id = %(owner)s
  AND (%(status)s::inferq.task_status[] IS NULL OR t.status = ANY(%(status)s))
  AND (%(agent)s::text IS NULL OR t.agent_id = %(agent)s)
  AND (%(pool)s::text IS NULL OR t.pool_name = %(pool)s)
  AND (%(after_ts)s::timestamptz IS NULL OR (t.created_at, t.id) < (%(after_ts)s, %(after_id)s))
ORDER BY t.created_at DESC, t.id DESC
LIMIT %(limit)s
"""
    ).format(task_select=TASK_SELECT)
)

# Quotas (sql/0007_quotas.sql): the claim steps over the tasks of tokens already at their
# max running, read once per claim; the trigger task_hold_running_quota is the exact check.
RUNNING_CAP = sql.SQL(
    "AND (q.token_id IS NULL OR q.token_id <> ALL ((SELECT inferq.capped_tokens())::uuid[]))"
)

# The head of each requested pool's queue, in drain order, read per pool through
# task_pending_drain_idx (pool_name, priority DESC, created_at, id). ``pool_name = ANY(...)``
# cannot use the index's order: PostgreSQL then reads every pending row of every pool and
# sorts them, on every claim (9.5 ms with 20,000 pending here, against 0.03 ms per pool).
_POOL_HEADS = sql.SQL(
    """
SELECT c.id, c.priority, c.created_at
FROM unnest(%(pools)s::text[]) AS p(name)
CROSS JOIN LATERAL (
    SELECT q.id, q.priority, q.created_at FROM inferq.task q
    WHERE q.status = 'pending' AND q.pool_name = p.name {quota}
    ORDER BY q.priority DESC, q.created_at, q.id
    LIMIT {limit}
    {lock}
) c
ORDER BY c.priority DESC, c.created_at, c.id
LIMIT {limit}
"""
)

FIND_PENDING = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
JOIN ({heads}) h ON h.id = t.id
ORDER BY t.priority DESC, t.created_at, t.id
"""
    ).format(
        task_select=TASK_SELECT,
        heads=_POOL_HEADS.format(limit=sql.SQL("%(limit)s"), lock=sql.SQL(""), quota=sql.SQL("")),
    )
)

HELD_BY_SESSION = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
WHERE t.claimed_by = %(session)s AND t.status IN ('claimed', 'running')
ORDER BY t.claimed_at
"""
    ).format(task_select=TASK_SELECT)
)

# SKIP LOCKED: racing claimers each take different rows and never wait on each other (each
# pool's head is locked as it is read, so a locked row is stepped over, not waited for; with
# several pools up to ``limit`` rows per pool are locked for the statement's instant, and the
# best of them are claimed). A bound session never holds more than its capacity, and an
# expired one claims nothing; an id with no session row claims up to the limit (tests, tools)
# or, when %(unbound)s is 0, nothing.
CLAIM = render(
    sql.SQL(
        """
WITH room AS (
    SELECT CASE WHEN s.expires_at > now() THEN greatest(0, s.capacity - (
        SELECT count(*) FROM inferq.task h
        WHERE h.claimed_by = s.id AND h.status IN ('claimed', 'running'))) ELSE 0 END AS n
    FROM inferq.worker_session s WHERE s.id = %(session)s
), wanted AS (
    SELECT least(%(limit)s, coalesce((SELECT n FROM room), %(unbound)s)) AS n
), picked AS ({heads})
UPDATE inferq.task t
SET status = 'claimed', claimed_by = %(session)s, claimed_at = now(), attempt = t.attempt + 1,
    lease_expires_at = now() + make_interval(secs => %(lease_s)s)
FROM picked WHERE t.id = picked.id
RETURNING {task_select}
"""
    ).format(
        task_select=TASK_SELECT,
        heads=_POOL_HEADS.format(
            limit=sql.SQL("(SELECT n FROM wanted)"),
            lock=sql.SQL("FOR UPDATE SKIP LOCKED"),
            quota=RUNNING_CAP,
        ),
    )
)

# Taken before a bound claim, in the same transaction: two claims of one session (a long-poll
# and an outcomes call) would otherwise both count the same free room, since a statement only
# sees what had committed when it began. The second waits here for the first to commit.
LOCK_SESSION = "SELECT 1 FROM inferq.worker_session WHERE id = %(session)s FOR UPDATE"

# The guard every worker write shares: this session holds this attempt of the task.
_HOLDS = sql.SQL("t.id = %(id)s AND t.claimed_by = %(session)s AND t.attempt = %(attempt)s")

START = render(
    sql.SQL(
        """
UPDATE inferq.task t SET status = 'running', stream_started_at = now(),
    lease_expires_at = coalesce(now() + make_interval(secs => %(lease_s)s), t.lease_expires_at)
WHERE {holds} AND t.status = 'claimed'
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS)
)

COMPLETE = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'completed', response_body = %(body)s, completed_at = now(), lease_expires_at = NULL
WHERE {holds} AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS)
)

FAIL = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'error', error_message = %(message)s, completed_at = now(), lease_expires_at = NULL
WHERE {holds} AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS)
)

CANCEL = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'cancelled', completed_at = now(), lease_expires_at = NULL,
    error_message = coalesce(%(reason)s, 'cancelled by the client')
WHERE t.id = %(id)s AND t.owner_id = %(owner)s AND t.status IN ('pending', 'claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

# A lost claim (lease expired, session reaped) counts against max_attempts: once the task was
# lost that often it ends in error. A graceful release (worker shutdown, unbind) never does.
LOST_FOR_GOOD = sql.SQL("(NOT %(graceful)s::boolean AND t.attempt - t.releases >= t.max_attempts)")
REVERT_SET = sql.SQL(
    """
SET status = (CASE WHEN {lost} THEN 'error' ELSE 'pending' END)::inferq.task_status,
    error_message = CASE WHEN {lost}
        THEN format('the worker was lost %%s times (max_attempts=%%s); last time %%s',
                    t.attempt - t.releases, t.max_attempts, %(reason)s::text)
        ELSE t.error_message END,
    completed_at = CASE WHEN {lost} THEN now() END,
    releases = t.releases + CASE WHEN %(graceful)s::boolean THEN 1 ELSE 0 END,
    claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, stream_started_at = NULL
"""
).format(lost=LOST_FOR_GOOD)

REVERT_SESSION = render(
    sql.SQL(
        """
UPDATE inferq.task t {revert_set}
WHERE t.claimed_by = %(session)s AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, revert_set=REVERT_SET)
)

REVERT_ONE = render(
    sql.SQL(
        """
UPDATE inferq.task t {revert_set}
WHERE {holds} AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS, revert_set=REVERT_SET)
)

REVERT_EXPIRED = render(
    sql.SQL(
        """
UPDATE inferq.task t {revert_set}
WHERE t.status IN ('claimed', 'running')
  AND t.lease_expires_at < coalesce(%(now)s::timestamptz, now())
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, revert_set=REVERT_SET)
)

# Completes and fails of one worker session in one statement: an item with an error fails its
# task, one without completes it. The items travel as one JSON array (jsonb_to_recordset): far
# cheaper to send than one array parameter per column with a Jsonb per response. Only
# (id, status, attempt) come back, not the whole row.
FINISH_MANY = """
UPDATE inferq.task t
SET status = (CASE WHEN c.error IS NULL THEN 'completed' ELSE 'error' END)::inferq.task_status,
    response_body = CASE WHEN c.error IS NULL THEN c.response ELSE t.response_body END,
    error_message = coalesce(c.error, t.error_message),
    completed_at = now(), lease_expires_at = NULL
FROM jsonb_to_recordset(%(items)s::jsonb)
    AS c(task_id uuid, attempt int, response jsonb, error text)
WHERE t.id = c.task_id AND t.claimed_by = %(session)s AND t.attempt = c.attempt
  AND t.status IN ('claimed', 'running')
RETURNING t.id, t.status::text, t.attempt
"""

# Of these tasks, the ones a waiter for the outcome must re-read: ended, or gone.
FINISHED_AMONG = """
SELECT u.id FROM unnest(%(ids)s::uuid[]) AS u(id)
LEFT JOIN inferq.task t ON t.id = u.id
WHERE t.id IS NULL OR t.status IN ('completed', 'error', 'cancelled')
"""

GC_PENDING = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'error', completed_at = coalesce(%(now)s::timestamptz, now()),
    error_message = format('not claimed within %%s s (INFERQ_PENDING_TIMEOUT_S): '
                           'no worker served pool %%s in time', %(timeout_s)s, t.pool_name)
WHERE t.status = 'pending'
  AND t.created_at < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(timeout_s)s)
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

GC_DELETE = """
DELETE FROM inferq.task t
WHERE t.status IN ('completed', 'error', 'cancelled')
  AND t.completed_at < coalesce(%(now)s::timestamptz, now())
                       - make_interval(secs => %(retention_s)s)
"""

# The owner's pending tasks, counted up to the cap (so never more than cap + 1 rows are read).
COUNT_PENDING = """
SELECT count(*) FROM (
    SELECT 1 FROM inferq.task WHERE owner_id = %(owner)s AND status = 'pending' LIMIT %(cap)s
) s
"""
