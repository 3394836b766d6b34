-- inferq 0002: the state machine guard and the status notifications.
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0002_triggers.sql   (or: inferq migrate)
BEGIN;

-- Legal status changes. Terminal states (completed, error, cancelled) have no way out:
--   pending -> claimed | cancelled | error (GC of stale pending)
--   claimed -> running | completed | error | cancelled | pending (revert)
--   running -> completed | error | cancelled | pending (revert)
CREATE FUNCTION inferq.transition_allowed(old_status inferq.task_status,
                                          new_status inferq.task_status)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE old_status
    WHEN 'pending' THEN new_status IN ('claimed', 'cancelled', 'error')
    WHEN 'claimed' THEN new_status IN ('running', 'completed', 'error', 'cancelled', 'pending')
    WHEN 'running' THEN new_status IN ('completed', 'error', 'cancelled', 'pending')
    ELSE false
END;

-- Rejects every update that is not a legal transition, even a hand-written one in psql.
-- SQLSTATE IQ001 = illegal transition, IQ002 = a terminal row was modified.
CREATE FUNCTION inferq.guard_task_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN ('completed', 'error', 'cancelled') THEN
        IF NEW IS DISTINCT FROM OLD THEN
            RAISE EXCEPTION 'task % is %, a terminal state; it cannot be changed', OLD.id, OLD.status
                USING ERRCODE = 'IQ002',
                      HINT = 'terminal tasks are final: submit a new task instead';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT inferq.transition_allowed(OLD.status, NEW.status) THEN
            RAISE EXCEPTION 'illegal task transition % -> % for task %', OLD.status, NEW.status, OLD.id
                USING ERRCODE = 'IQ001',
                      HINT = 'allowed: pending->claimed|cancelled|error, claimed->running|completed|error|cancelled|pending, running->completed|error|cancelled|pending';
        END IF;
        IF NEW.status IN ('completed', 'error', 'cancelled') AND NEW.completed_at IS NULL THEN
            NEW.completed_at := now();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER task_guard_transition
    BEFORE UPDATE ON inferq.task
    FOR EACH ROW EXECUTE FUNCTION inferq.guard_task_transition();

-- A new task may only start as pending.
CREATE FUNCTION inferq.guard_task_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'pending' THEN
        RAISE EXCEPTION 'a new task must be pending, not %', NEW.status
            USING ERRCODE = 'IQ001';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER task_guard_insert
    BEFORE INSERT ON inferq.task
    FOR EACH ROW EXECUTE FUNCTION inferq.guard_task_insert();

-- Channel 'inferq_task': one notification per statement (split every 50 rows so a payload
-- stays far below the 8000-byte limit). Payload: a JSON array of [id, status, pool, attempt]
-- for each row inserted or whose status changed. Updates that keep the status send nothing.
-- A notification is a hint: listeners re-read the rows it names.
CREATE FUNCTION inferq.notify_task_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('inferq_task', '[' || string_agg(item, ',') || ']')
        FROM (
            SELECT json_build_array(n.id, n.status, n.pool_name, n.attempt)::text AS item,
                   (row_number() OVER () - 1) / 50 AS grp
            FROM new_rows n
        ) s
        GROUP BY grp;
    ELSE
        PERFORM pg_notify('inferq_task', '[' || string_agg(item, ',') || ']')
        FROM (
            SELECT json_build_array(n.id, n.status, n.pool_name, n.attempt)::text AS item,
                   (row_number() OVER () - 1) / 50 AS grp
            FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE n.status IS DISTINCT FROM o.status
        ) s
        GROUP BY grp;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER task_notify_insert
    AFTER INSERT ON inferq.task
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.notify_task_status();

CREATE TRIGGER task_notify_update
    AFTER UPDATE ON inferq.task
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.notify_task_status();

INSERT INTO inferq.schema_migration (version, name) VALUES (2, '0002_triggers');
COMMIT;
