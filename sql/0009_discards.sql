-- inferq 0009: tasks a token throws away (cancelled or failed) count against an hourly limit,
-- so submit-then-cancel cannot grow the task table without bound (the pending cap never sees
-- a task that is cancelled before the next submit).
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0009_discards.sql   (or: inferq migrate)
-- Depends on 0007 (token_quota, token_rate).
BEGIN;

-- A token's own limit on its tasks that ended cancelled or failed in the last 60 minutes;
-- NULL: the server's default (INFERQ_MAX_DISCARDED_PER_HOUR).
ALTER TABLE inferq.token_quota
    ADD COLUMN discarded_per_hour integer CHECK (discarded_per_hour BETWEEN 0 AND 100000000);

-- Counted on the token's minute rows (the maintenance sweep keeps them for an hour, which is
-- what the rolling window needs).
ALTER TABLE inferq.token_rate ADD COLUMN discarded integer NOT NULL DEFAULT 0;

-- Per token and minute, the tasks that moved into cancelled or failed in this statement (tasks
-- without a token, such as batch lines, are not counted: a batch is bounded by its file). A
-- trigger of its own beside 0007's task_add_usage, which it leaves as it is.
CREATE FUNCTION inferq.count_task_discards() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Most statements end no token's task as cancelled or failed: leave at once.
    IF NOT EXISTS (SELECT 1 FROM new_rows
                   WHERE status IN ('cancelled', 'error') AND token_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO inferq.token_rate AS r (token_id, minute, discarded)
    SELECT n.token_id, date_trunc('minute', now()), count(*)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status IN ('cancelled', 'error') AND o.status NOT IN ('cancelled', 'error')
      AND n.token_id IS NOT NULL
    GROUP BY 1, 2
    ON CONFLICT (token_id, minute) DO UPDATE SET discarded = r.discarded + EXCLUDED.discarded;
    RETURN NULL;
END;
$$;

CREATE TRIGGER task_count_discards
    AFTER UPDATE ON inferq.task
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.count_task_discards();

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
