-- inferq 0009: tasks a token throws away (cancelled or failed) count against an hourly limit,
-- so submit-then-cancel cannot grow the task table without bound (the pending cap never sees
-- a task that is cancelled before the next submit).
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0009_discards.sql   (or: inferq migrate)
-- Depends on 0007 (token_quota, token_rate, add_task_usage).
BEGIN;

-- A token's own limit on its tasks that ended cancelled or failed in the last 60 minutes;
-- NULL: the server's default (INFERQ_MAX_DISCARDED_PER_HOUR).
ALTER TABLE inferq.token_quota
    ADD COLUMN discarded_per_hour integer CHECK (discarded_per_hour BETWEEN 0 AND 100000000);

-- Counted on the token's minute rows (the maintenance sweep keeps them for an hour, which is
-- what the rolling window needs).
ALTER TABLE inferq.token_rate ADD COLUMN discarded integer NOT NULL DEFAULT 0;

-- The statement trigger of 0007 also counts, per token and minute, the tasks that moved into
-- cancelled or failed in this statement (tasks without a token, such as batch lines, are not
-- counted: a batch is bounded by its file).
CREATE OR REPLACE FUNCTION inferq.add_task_usage() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    completes boolean;
    discards boolean;
BEGIN
    SELECT coalesce(bool_or(status = 'completed'), false),
           coalesce(bool_or(status IN ('cancelled', 'error') AND token_id IS NOT NULL), false)
    INTO completes, discards
    FROM new_rows;
    IF discards THEN
        INSERT INTO inferq.token_rate AS r (token_id, minute, discarded)
        SELECT n.token_id, date_trunc('minute', now()), count(*)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IN ('cancelled', 'error') AND o.status NOT IN ('cancelled', 'error')
          AND n.token_id IS NOT NULL
        GROUP BY 1, 2
        ON CONFLICT (token_id, minute) DO UPDATE SET discarded = r.discarded + EXCLUDED.discarded;
    END IF;
    -- Most statements complete nothing (claims, starts, heartbeats): leave at once.
    IF NOT completes THEN
        RETURN NULL;
    END IF;
    INSERT INTO inferq.usage_hour AS u
        (hour, owner_id, token_id, model, requests, prompt_tokens, completion_tokens)
    SELECT date_trunc('hour', n.completed_at), n.owner_id, n.token_id,
           coalesce(n.llm_name, n.model), count(*),
           coalesce(sum(n.prompt_tokens), 0), coalesce(sum(n.completion_tokens), 0)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status = 'completed' AND o.status IS DISTINCT FROM 'completed'
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (hour, owner_id, token_id, model) DO UPDATE
    SET requests = u.requests + EXCLUDED.requests,
        prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens;
    INSERT INTO inferq.token_rate AS r (token_id, minute, tokens)
    SELECT n.token_id, date_trunc('minute', now()),
           sum(coalesce(n.prompt_tokens, 0) + coalesce(n.completion_tokens, 0))
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    JOIN inferq.token_quota q ON q.token_id = n.token_id AND q.tokens_per_minute IS NOT NULL
    WHERE n.status = 'completed' AND o.status IS DISTINCT FROM 'completed'
    GROUP BY 1, 2
    ON CONFLICT (token_id, minute) DO UPDATE SET tokens = r.tokens + EXCLUDED.tokens;
    RETURN NULL;
END;
$$;

-- The token of a new task, once its discards of the last 60 minutes are under its limit (its
-- own, else ``server_limit``; 0 or NULL from both: no limit). The submit's INSERT calls it on
-- its token column, so the check costs no round trip. Over the limit it raises IQ429, whose
-- DETAIL is "<discarded> <limit> <seconds until the oldest counted minute leaves the window>".
CREATE FUNCTION inferq.admit_discards(token uuid, server_limit integer) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
DECLARE
    cap integer;
    used bigint;
    oldest timestamptz;
BEGIN
    IF token IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT q.discarded_per_hour INTO cap FROM inferq.token_quota q WHERE q.token_id = token;
    cap := coalesce(cap, nullif(server_limit, 0));
    IF cap IS NULL THEN
        RETURN token;
    END IF;
    SELECT coalesce(sum(r.discarded), 0), min(r.minute) FILTER (WHERE r.discarded > 0)
    INTO used, oldest
    FROM inferq.token_rate r
    WHERE r.token_id = token AND r.minute > now() - interval '1 hour';
    IF used >= cap THEN
        RAISE EXCEPTION 'token % discarded % tasks in the last hour, its limit is %',
                token, used, cap
            USING ERRCODE = 'IQ429',
                  DETAIL = used || ' ' || cap || ' ' ||
                      ceil(greatest(1, extract(epoch FROM oldest + interval '1 hour' - now())));
    END IF;
    RETURN token;
END;
$$;

INSERT INTO inferq.schema_migration (version, name) VALUES (9, '0009_discards');
COMMIT;
