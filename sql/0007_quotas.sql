-- inferq 0007: quotas per token, enforced in the database across replicas; usage accounting.
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0007_quotas.sql   (or: inferq migrate)
-- Depends on 0001-0005 only (not on 0006's lanes).
BEGIN;

-- A task remembers the token that submitted it (quotas are per token; NULL for tasks written
-- before this file and for batch lines), and, once completed, the tokens its answer used.
ALTER TABLE inferq.task
    ADD COLUMN token_id           uuid,
    ADD COLUMN prompt_tokens      integer CHECK (prompt_tokens >= 0),
    ADD COLUMN completion_tokens  integer CHECK (completion_tokens >= 0);
-- Max running (at claim time) and max pending (at admission) count a token's tasks.
CREATE INDEX task_token_held_idx ON inferq.task (token_id)
    WHERE status IN ('claimed', 'running') AND token_id IS NOT NULL;
CREATE INDEX task_token_pending_idx ON inferq.task (token_id)
    WHERE status = 'pending' AND token_id IS NOT NULL;

-- A token's limits; a NULL column is no limit, a token without a row has none at all.
CREATE TABLE inferq.token_quota (
    token_id             uuid PRIMARY KEY REFERENCES inferq.api_token (id) ON DELETE CASCADE,
    max_pending          integer CHECK (max_pending BETWEEN 0 AND 100000000),
    max_running          integer CHECK (max_running BETWEEN 0 AND 100000000),
    requests_per_minute  integer CHECK (requests_per_minute BETWEEN 0 AND 100000000),
    tokens_per_minute    bigint CHECK (tokens_per_minute BETWEEN 0 AND 1000000000000),
    tokens_per_day       bigint CHECK (tokens_per_day BETWEEN 0 AND 1000000000000),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- One row per token and minute (database time): the requests admitted in it (one atomic
-- upsert per submit) and the tokens of the tasks completed in it (tokens per minute).
CREATE TABLE inferq.token_rate (
    token_id  uuid NOT NULL,
    minute    timestamptz NOT NULL,
    requests  integer NOT NULL DEFAULT 0,
    tokens    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (token_id, minute)
);
CREATE INDEX token_rate_minute_idx ON inferq.token_rate (minute);

-- Usage totals per hour, owner, token and model (the registry name the client used, else the
-- upstream model; NULL for a task routed by pool), kept in step with completions by the
-- trigger below: the transaction that completes a task adds its usage, once.
CREATE TABLE inferq.usage_hour (
    hour               timestamptz NOT NULL,
    owner_id           text NOT NULL,
    token_id           uuid,
    model              text,
    requests           bigint NOT NULL DEFAULT 0,
    prompt_tokens      bigint NOT NULL DEFAULT 0,
    completion_tokens  bigint NOT NULL DEFAULT 0,
    UNIQUE NULLS NOT DISTINCT (hour, owner_id, token_id, model)
);
CREATE INDEX usage_hour_owner_idx ON inferq.usage_hour (owner_id, hour);
CREATE INDEX usage_hour_token_idx ON inferq.usage_hour (token_id, hour);

-- A count in a JSON document as an integer, or NULL when it is not a non-negative number
-- (a worker's answer is not trusted to be well formed; it must never fail the completion).
CREATE FUNCTION inferq.usage_count(value jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(value) = 'number' AND (value #>> '{}')::numeric >= 0
            THEN least((value #>> '{}')::numeric, 2147483647)::integer END;

-- On the transition into completed (exactly once per task: terminal states cannot be left),
-- the task keeps the usage of its answer: OpenAI's `usage` object of the response body.
CREATE FUNCTION inferq.record_task_usage() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(NEW.response_body) = 'object'
       AND jsonb_typeof(NEW.response_body -> 'usage') = 'object' THEN
        NEW.prompt_tokens := inferq.usage_count(NEW.response_body -> 'usage' -> 'prompt_tokens');
        NEW.completion_tokens :=
            inferq.usage_count(NEW.response_body -> 'usage' -> 'completion_tokens');
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER task_record_usage
    BEFORE UPDATE ON inferq.task
    FOR EACH ROW
    WHEN (NEW.status = 'completed' AND OLD.status IS DISTINCT FROM 'completed')
    EXECUTE FUNCTION inferq.record_task_usage();

-- The totals: one upsert per (hour, owner, token, model) of a statement's completions, and
-- the token's minute row for tokens-per-minute quotas. Only rows that moved into completed
-- in this statement count, so a re-run attempt (the first one was lost) is counted once, by
-- the attempt that completed; a stale attempt's write never reaches this point.
-- The upsert locks the totals row until commit, so completions of one owner, token and model
-- commit one after the other; they already do, since a notifying commit takes PostgreSQL's
-- notify lock (see the performance notes of DESIGN.md).
CREATE FUNCTION inferq.add_task_usage() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Most statements complete nothing (claims, starts, heartbeats): leave at once.
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status = 'completed') THEN
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

CREATE TRIGGER task_add_usage
    AFTER UPDATE ON inferq.task
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.add_task_usage();

-- Max running, enforced where a task is claimed: a claim of a task whose token already holds
-- max_running claimed or running tasks leaves that task pending (a BEFORE trigger returning
-- NULL skips the row; the claim statement itself is unchanged). The token's quota row is
-- locked first, so claims on several replicas count one after the other; a claim that finds
-- it locked by another claim in flight skips the task rather than wait (no claim ever waits,
-- and two claims locking two tokens' rows in opposite orders cannot deadlock).
CREATE FUNCTION inferq.hold_running_quota() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cap integer;
    held bigint;
BEGIN
    SELECT max_running INTO cap FROM inferq.token_quota WHERE token_id = NEW.token_id;
    IF cap IS NULL THEN
        RETURN NEW;
    END IF;
    PERFORM 1 FROM inferq.token_quota WHERE token_id = NEW.token_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO held FROM inferq.task
    WHERE token_id = NEW.token_id AND status IN ('claimed', 'running');
    IF held >= cap THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER task_hold_running_quota
    BEFORE UPDATE ON inferq.task
    FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status = 'claimed' AND NEW.token_id IS NOT NULL)
    EXECUTE FUNCTION inferq.hold_running_quota();

-- The tokens at their max running, read once per claim (the claim skips their tasks, so a
-- capped owner's queue head never stalls the others'; the trigger above is the exact check).
CREATE FUNCTION inferq.capped_tokens() RETURNS uuid[]
LANGUAGE sql STABLE
RETURN (
    SELECT coalesce(array_agg(q.token_id), '{}')
    FROM inferq.token_quota q
    WHERE q.max_running IS NOT NULL
      AND (SELECT count(*) FROM inferq.task h
           WHERE h.token_id = q.token_id AND h.status IN ('claimed', 'running')) >= q.max_running
);

INSERT INTO inferq.schema_migration (version, name) VALUES (7, '0007_quotas');
COMMIT;
