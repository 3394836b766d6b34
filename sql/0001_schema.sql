-- inferq 0001: schema, tables and the indexes of every hot path.
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0001_schema.sql   (or: inferq migrate)
BEGIN;

CREATE SCHEMA inferq;

-- One row per applied file. The file records itself (version, name); `inferq migrate`
-- adds the checksum afterwards, and adopts the current checksum for files a DBA applied.
CREATE TABLE inferq.schema_migration (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TYPE inferq.task_status AS ENUM
    ('pending', 'claimed', 'running', 'completed', 'error', 'cancelled');

-- Pool names travel in notification payloads, so they are short identifiers.
CREATE DOMAIN inferq.pool_name AS text
    CHECK (VALUE ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$');

-- The LLM registry: what a client names as `model` and where it is routed.
CREATE TABLE inferq.llm (
    name        text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    pool_name   inferq.pool_name NOT NULL,
    model       text NOT NULL,
    tier        text NOT NULL DEFAULT 'standard',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API tokens: only the SHA-256 of the secret is stored.
CREATE TABLE inferq.api_token (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash  bytea NOT NULL UNIQUE,
    owner_id    text NOT NULL CHECK (length(owner_id) BETWEEN 1 AND 200),
    role        text NOT NULL CHECK (role IN ('client', 'worker', 'admin')),
    pools       text[],                      -- NULL: every pool (worker tokens)
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- A bound worker: it holds tasks while it heartbeats before expires_at.
CREATE TABLE inferq.worker_session (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id      text NOT NULL,
    name          text,
    pools         text[] NOT NULL CHECK (cardinality(pools) > 0),
    capacity      integer NOT NULL CHECK (capacity BETWEEN 1 AND 10000),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX worker_session_expiry_idx ON inferq.worker_session (expires_at);

CREATE TABLE inferq.task (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    status             inferq.task_status NOT NULL DEFAULT 'pending',
    -- Routing is copied at enqueue time: renaming an LLM's pool never reroutes queued work.
    pool_name          inferq.pool_name NOT NULL,
    llm_name           text,
    model              text,
    tier               text,
    streaming          boolean NOT NULL DEFAULT false,
    request_body       jsonb NOT NULL,
    response_body      jsonb,
    error_message      text,
    claimed_by         uuid,                 -- worker_session.id while claimed/running
    claimed_at         timestamptz,
    -- clock_timestamp(), not now(): rows inserted by one statement keep their order (FIFO).
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    stream_started_at  timestamptz,
    completed_at       timestamptz,
    owner_id           text NOT NULL,
    agent_id           text,
    attempt            integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Claims given back on purpose (worker shutdown): they do not count as lost attempts.
    releases           integer NOT NULL DEFAULT 0 CHECK (releases >= 0),
    max_attempts       integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    lease_expires_at   timestamptz,
    priority           integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    idempotency_key    text CHECK (length(idempotency_key) BETWEEN 1 AND 255)
);

-- The drain: pending work of a pool, highest priority first, then FIFO.
CREATE INDEX task_pending_drain_idx ON inferq.task (pool_name, priority DESC, created_at, id)
    WHERE status = 'pending';
-- What a worker session holds (heartbeat, unbind, reaper).
CREATE INDEX task_held_by_session_idx ON inferq.task (claimed_by)
    WHERE status IN ('claimed', 'running');
-- The rescuer: leases that ran out.
CREATE INDEX task_lease_expiry_idx ON inferq.task (lease_expires_at)
    WHERE status IN ('claimed', 'running');
-- GC: terminal rows by age, and pending rows by age.
CREATE INDEX task_terminal_gc_idx ON inferq.task (completed_at)
    WHERE status IN ('completed', 'error', 'cancelled');
CREATE INDEX task_pending_age_idx ON inferq.task (created_at)
    WHERE status = 'pending';
-- Listings, newest first, with (created_at, id) as the cursor.
CREATE INDEX task_owner_listing_idx ON inferq.task (owner_id, created_at DESC, id DESC);
CREATE INDEX task_agent_listing_idx ON inferq.task (owner_id, agent_id, created_at DESC, id DESC)
    WHERE agent_id IS NOT NULL;
-- Idempotent submit: one task per (owner, key).
CREATE UNIQUE INDEX task_idempotency_idx ON inferq.task (owner_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Token deltas relayed between replicas, one row per run of consecutive chunks a worker posted
-- (a flush writes a few hundred rows, not thousands). UNLOGGED: a crash loses in-flight deltas,
-- never a result, because the final body is stored on the task row at completion.
CREATE UNLOGGED TABLE inferq.task_chunk (
    task_id     uuid NOT NULL,
    attempt     integer NOT NULL,
    first_seq   integer NOT NULL CHECK (first_seq >= 1),
    last_seq    integer NOT NULL,
    data        text NOT NULL,               -- JSON array: the chunks first_seq..last_seq
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, first_seq),
    CHECK (last_seq >= first_seq)
);

-- Leadership of maintenance sweeps: one row per sweep, held by one replica at a time.
CREATE TABLE inferq.maintenance_lease (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);

INSERT INTO inferq.schema_migration (version, name) VALUES (1, '0001_schema');
COMMIT;
