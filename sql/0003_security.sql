-- inferq 0003: security. Per-model caps on what one request may ask a worker for (`n` and
-- `max_tokens`; NULL: the replica's INFERQ_MAX_N / INFERQ_MAX_TOKENS), and the index the
-- replicas' revocation poll reads (recently revoked tokens).
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0003_security.sql   (or: inferq migrate)
BEGIN;

ALTER TABLE inferq.llm
    ADD COLUMN max_tokens integer
        CONSTRAINT llm_max_tokens_check CHECK (max_tokens BETWEEN 1 AND 100000000),
    ADD COLUMN max_n integer
        CONSTRAINT llm_max_n_check CHECK (max_n BETWEEN 1 AND 1000);

CREATE INDEX api_token_revoked_idx ON inferq.api_token (revoked_at)
    WHERE revoked_at IS NOT NULL;

INSERT INTO inferq.schema_migration (version, name) VALUES (3, '0003_security');
COMMIT;
