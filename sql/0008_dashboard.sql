-- inferq 0008: the dashboard: browser sessions of admin tokens, a per-minute rollup of the queue,
-- and notifications when worker sessions or batches change (the pages are live on them).
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0008_dashboard.sql   (or: inferq migrate)
BEGIN;

-- A browser's login: only the SHA-256 of the cookie is stored. The session dies with its
-- token (revoked or deleted) and at expires_at; csrf is echoed by every state-changing request.
CREATE TABLE inferq.dashboard_session (
    cookie_hash  bytea PRIMARY KEY,
    token_id     uuid NOT NULL REFERENCES inferq.api_token (id) ON DELETE CASCADE,
    csrf         text NOT NULL CHECK (length(csrf) >= 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX dashboard_session_expiry_idx ON inferq.dashboard_session (expires_at);

-- One row per minute and pool, written by the maintenance leader's rollup sweep: the queue's
-- depth when last sampled in that minute, and the tasks that ended in it. Every replica draws
-- its charts from here, so they all draw the same. (A lane column joins the key once lanes exist.)
CREATE TABLE inferq.queue_minute (
    minute     timestamptz NOT NULL,
    pool_name  text NOT NULL,
    pending    integer NOT NULL DEFAULT 0 CHECK (pending >= 0),
    running    integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    completed  integer NOT NULL DEFAULT 0 CHECK (completed >= 0),
    errors     integer NOT NULL DEFAULT 0 CHECK (errors >= 0),
    PRIMARY KEY (minute, pool_name)
);

-- Worker sessions bound, unbound or reaped, batches created or changing status, and rollup
-- samples: one small notification per statement (heartbeats update none, so they notify nothing).
CREATE FUNCTION inferq.notify_dashboard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_OP);
    RETURN NULL;
END;
$$;

CREATE TRIGGER worker_session_notify
    AFTER INSERT OR DELETE ON inferq.worker_session
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.notify_dashboard('inferq_session');

CREATE TRIGGER batch_notify
    AFTER INSERT OR UPDATE OF status ON inferq.batch
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.notify_dashboard('inferq_batch');

-- The rollup sweep wrote a sample (every few seconds, from one replica): every replica redraws.
CREATE TRIGGER queue_minute_notify
    AFTER INSERT OR UPDATE ON inferq.queue_minute
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.notify_dashboard('inferq_rollup');

INSERT INTO inferq.schema_migration (version, name) VALUES (8, '0008_dashboard');
COMMIT;
