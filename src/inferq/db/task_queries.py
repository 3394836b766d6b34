"""The SQL of TaskRepository: every task read, and every transition as one guarded statement."""

from __future__ import annotations

from psycopg import sql

from inferq.db.rows import TASK_SELECT, render

ENQUEUE = render(
    sql.SQL(
        """
INSERT INTO inferq.task AS t (pool_name, llm_name, model, tier, streaming, request_body,
                              owner_id, agent_id, priority, max_attempts, idempotency_key,
                              lane, token_id)
VALUES (%(pool)s, %(llm)s, %(model)s, %(tier)s, %(streaming)s, %(body)s,
        %(owner)s, %(agent)s, %(priority)s, %(max_attempts)s, %(key)s, %(lane)s,
        inferq.admit_discards(%(token)s::uuid, %(discard_cap)s))
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

# Pending tasks of the requested pools by priority then FIFO, across lanes and owners (a view
# for tools and tests, not the claim's order: see CLAIM), read per pool.
_POOL_HEADS = sql.SQL(
    """
SELECT c.id, c.priority, c.created_at
FROM unnest(%(pools)s::text[]) AS p(name)
CROSS JOIN LATERAL (
    SELECT q.id, q.priority, q.created_at FROM inferq.task q
    WHERE q.status = 'pending' AND q.pool_name = p.name
    ORDER BY q.priority DESC, q.created_at, q.id
    LIMIT %(limit)s
) c
ORDER BY c.priority DESC, c.created_at, c.id
LIMIT %(limit)s
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
        heads=_POOL_HEADS,
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

# An owner's recent use in a lane: its claims, halved every %(half_life_s)s since usage_at
# (zero after 60 half-lives, before power() could underflow).
_DECAYED = sql.SQL(
    "CASE WHEN f.usage_at < now() - make_interval(secs => 60 * %(half_life_s)s) THEN 0::float8 "
    "ELSE f.usage * power(0.5::float8, greatest(0::float8, "
    "extract(epoch FROM now() - f.usage_at)::float8 / %(half_life_s)s)) END"
)

# The claim (README, "Lanes and fair share"; sql/0006_scheduling.sql). The rows to take, best
# first, and only as many as are needed (the LIMITs stop each scan early):
#   1. aging: pending tasks of the pools that waited %(aging_s)s, oldest first, whatever their
#      lane and priority (task_pending_pool_age_idx);
#   2. then lane by lane in %(lanes)s order, a lane read only when the ones before it left the
#      claim short: the lane's owners by decayed use per weight (inferq.fair_share, a few rows
#      per owner), and each owner's pending work, priority then FIFO (task_lane_drain_idx),
#      until enough rows are found. A claim of n takes them from the first owners in that
#      order; the use it adds decides the next claim.
# The branches of UNION ALL and the lanes of unnest() are read in order (an Append and a nested
# loop keep it; the claim plans no parallel workers), which is the order that LIMIT keeps.
# SKIP LOCKED: racing claimers each take different rows and never wait on each other's task
# rows. A bound session never holds more than its capacity, and an expired one claims nothing;
# an id with no session row claims up to the limit (tests, tools) or, when %(unbound)s is 0,
# nothing. The use of each owner served is then added to its fair_share row, locked in key
# order (two claims serving the same owner queue there for a commit, never deadlock). The
# update finds its rows by id (= ANY(ARRAY(...)): a join there may be planned as a scan of the
# whole table when its statistics are stale, and a row picked twice is updated once). The rows
# come back in lane order, then priority, then FIFO: the order a worker should start them in.
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
), picked AS (
    SELECT c.id FROM (
        (SELECT a.id FROM unnest(%(pools)s::text[]) AS p(name)
         CROSS JOIN LATERAL (
            SELECT q.id, q.created_at FROM inferq.task q
            WHERE q.status = 'pending' AND q.pool_name = p.name
              AND q.created_at < now() - make_interval(secs => %(aging_s)s) {quota}
            ORDER BY q.created_at, q.id
            LIMIT (SELECT n FROM wanted)
            FOR UPDATE SKIP LOCKED
         ) a
         ORDER BY a.created_at, a.id
         LIMIT (SELECT n FROM wanted))
        UNION ALL
        (SELECT h.id FROM unnest(%(lanes)s::text[]) AS l(name)
         CROSS JOIN LATERAL (
            SELECT f.pool_name, f.owner_id FROM inferq.fair_share f
            WHERE f.lane = l.name AND f.pool_name = ANY(%(pools)s::text[])
            ORDER BY ({decayed}) / f.weight, f.owner_id
         ) o
         CROSS JOIN LATERAL (
            SELECT q.id FROM inferq.task q
            WHERE q.status = 'pending' AND q.pool_name = o.pool_name AND q.lane = l.name
              AND q.owner_id = o.owner_id {quota}
            ORDER BY q.priority DESC, q.created_at, q.id
            LIMIT (SELECT n FROM wanted)
            FOR UPDATE SKIP LOCKED
         ) h
         LIMIT (SELECT n FROM wanted))
    ) c
    LIMIT (SELECT n FROM wanted)
), claimed AS (
    UPDATE inferq.task t
    SET status = 'claimed', claimed_by = %(session)s, claimed_at = now(),
        attempt = t.attempt + 1, lease_expires_at = now() + make_interval(secs => %(lease_s)s)
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING {task_select}
), served AS (
    SELECT f.pool_name, f.lane, f.owner_id, u.n
    FROM inferq.fair_share f
    JOIN (SELECT pool_name, lane, owner_id, count(*) AS n FROM claimed
          GROUP BY pool_name, lane, owner_id) u
      ON (f.pool_name, f.lane, f.owner_id) = (u.pool_name, u.lane, u.owner_id)
    ORDER BY f.pool_name, f.lane, f.owner_id
    FOR UPDATE OF f
), used AS (
    UPDATE inferq.fair_share f SET usage = ({decayed}) + s.n, usage_at = now()
    FROM served s WHERE (f.pool_name, f.lane, f.owner_id) = (s.pool_name, s.lane, s.owner_id)
)
SELECT * FROM claimed c
ORDER BY array_position(%(lanes)s::text[], c.lane), c.priority DESC, c.created_at, c.id
"""
    ).format(task_select=TASK_SELECT, decayed=_DECAYED, quota=RUNNING_CAP)
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
# (id, status, attempt, lane) come back, not the whole row.
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
RETURNING t.id, t.status::text, t.attempt, t.lane
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
