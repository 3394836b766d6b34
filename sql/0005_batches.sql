-- inferq 0005: OpenAI's Files and Batches: files stored in parts, batches whose lines are tasks.
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0005_batches.sql   (or: inferq migrate)
BEGIN;

-- A file is visible once its upload finished (status 'processed'); a row still 'uploading'
-- (its replica died mid-upload) is never listed or read, and GC removes it.
CREATE TABLE inferq.file (
    id          text PRIMARY KEY CHECK (id ~ '^file-[A-Za-z0-9]{24}$'),
    owner_id    text NOT NULL,
    purpose     text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    text NOT NULL CHECK (length(filename) BETWEEN 1 AND 255),
    bytes       bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    lines       integer NOT NULL DEFAULT 0 CHECK (lines >= 0),
    status      text NOT NULL DEFAULT 'uploading'
                CHECK (status IN ('uploading', 'processed')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Listings, newest first, per owner; stale uploads for GC.
CREATE INDEX file_owner_idx ON inferq.file (owner_id, created_at DESC, id DESC);
CREATE INDEX file_uploading_idx ON inferq.file (created_at) WHERE status = 'uploading';

-- The content, in parts of about a MiB, in order: a replica streams them in and out and never
-- holds a whole file. Each part ends at a line boundary (but for a line longer than a part).
CREATE TABLE inferq.file_part (
    file_id  text NOT NULL REFERENCES inferq.file (id) ON DELETE CASCADE,
    n        integer NOT NULL CHECK (n >= 0),
    data     bytea NOT NULL,
    PRIMARY KEY (file_id, n)
);

CREATE TABLE inferq.batch (
    id                 text PRIMARY KEY CHECK (id ~ '^batch_[A-Za-z0-9]{24}$'),
    owner_id           text NOT NULL,
    endpoint           text NOT NULL CHECK (endpoint IN ('/v1/chat/completions', '/v1/completions')),
    input_file_id      text NOT NULL,
    completion_window  text NOT NULL CHECK (completion_window = '24h'),
    status             text NOT NULL DEFAULT 'validating' CHECK (status IN (
                           'validating', 'failed', 'in_progress', 'finalizing', 'completed',
                           'expired', 'cancelling', 'cancelled')),
    metadata           jsonb,
    errors             jsonb,      -- OpenAI's {"object": "list", "data": [...]} when it failed
    output_file_id     text,
    error_file_id      text,
    total              integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz NOT NULL,
    in_progress_at     timestamptz,
    finalizing_at      timestamptz,
    completed_at       timestamptz,
    failed_at          timestamptz,
    expired_at         timestamptz,
    cancelling_at      timestamptz,
    cancelled_at       timestamptz
);
CREATE INDEX batch_owner_idx ON inferq.batch (owner_id, created_at DESC, id DESC);
-- The batches the maintenance sweep has work for.
CREATE INDEX batch_open_idx ON inferq.batch (created_at)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- A batch's lines are tasks: which batch, and the line's custom_id.
ALTER TABLE inferq.task ADD COLUMN batch_id text, ADD COLUMN custom_id text;
CREATE INDEX task_batch_idx ON inferq.task (batch_id, status) WHERE batch_id IS NOT NULL;

INSERT INTO inferq.schema_migration (version, name) VALUES (5, '0005_batches');
COMMIT;
