-- inferq 0006: scheduling: lanes, what a token may ask for, fair share between owners, aging.
-- Apply with: psql -v ON_ERROR_STOP=1 -f sql/0006_scheduling.sql   (or: inferq migrate)
BEGIN;

-- A task's lane: a pool serves 'interactive', then 'default', then 'batch' (inferq.domain.lanes
-- holds the order; the claim in inferq.db.task_queries follows it).
ALTER TABLE inferq.task ADD COLUMN lane text NOT NULL DEFAULT 'default'
    CHECK (lane IN ('interactive', 'default', 'batch'));

-- What a client token may ask for, and its owner's share of a lane under saturation. Tokens
-- made before this file keep what they could do (every lane, every priority); new tokens get
-- the defaults of `inferq token create` (inferq.domain.lanes).
ALTER TABLE inferq.api_token
    ADD COLUMN lanes text[] NOT NULL DEFAULT '{interactive,default,batch}'
        CHECK (lanes <@ '{interactive,default,batch}' AND cardinality(lanes) > 0),
    ADD COLUMN priority_min integer NOT NULL DEFAULT -1000 CHECK (priority_min >= -1000),
    ADD COLUMN priority_max integer NOT NULL DEFAULT 1000 CHECK (priority_max <= 1000),
    ADD COLUMN weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    ADD CONSTRAINT api_token_priority_range CHECK (priority_min <= priority_max);
CREATE INDEX api_token_owner_idx ON inferq.api_token (owner_id);

-- The claim's path: per pool and lane, the owner with the least recent use per weight, then
-- that owner's pending work, priority then FIFO. It replaces task_pending_drain_idx.
CREATE INDEX task_lane_drain_idx
    ON inferq.task (pool_name, lane, owner_id, priority DESC, created_at, id)
    WHERE status = 'pending';
-- Aging and the oldest pending task per pool (metrics, `inferq status`).
CREATE INDEX task_pending_pool_age_idx ON inferq.task (pool_name, created_at, id)
    WHERE status = 'pending';
DROP INDEX inferq.task_pending_drain_idx;

-- Fair share: one row per (pool, lane, owner) that ever queued there. `usage` is the owner's
-- claims, decayed by half every INFERQ_FAIR_SHARE_HALF_LIFE_S since `usage_at`; the claim
-- serves the owner with the least usage / weight and adds what it claimed. `weight` is the
-- largest weight of the owner's live tokens (kept in step by inferq.db.tokens).
CREATE TABLE inferq.fair_share (
    pool_name  inferq.pool_name NOT NULL,
    lane       text NOT NULL CHECK (lane IN ('interactive', 'default', 'batch')),
    owner_id   text NOT NULL,
    weight     integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    usage      double precision NOT NULL DEFAULT 0 CHECK (usage >= 0),
    usage_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool_name, lane, owner_id)
);
CREATE INDEX fair_share_owner_idx ON inferq.fair_share (owner_id);

-- Every inserted task's (pool, lane, owner) has its fair_share row, whatever path inserted it
-- (submit, a batch's lines, psql): a task whose owner has no row would never be claimed but
-- by aging. One statement per insert statement; an existing row is left alone (no lock).
CREATE FUNCTION inferq.ensure_fair_share() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO inferq.fair_share (pool_name, lane, owner_id, weight)
    SELECT n.pool_name, n.lane, n.owner_id,
           coalesce((SELECT max(k.weight) FROM inferq.api_token k
                     WHERE k.owner_id = n.owner_id AND k.revoked_at IS NULL), 1)
    FROM (SELECT DISTINCT pool_name, lane, owner_id FROM new_tasks) n
    WHERE NOT EXISTS (SELECT 1 FROM inferq.fair_share f
                      WHERE (f.pool_name, f.lane, f.owner_id) = (n.pool_name, n.lane, n.owner_id))
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER task_ensure_fair_share
    AFTER INSERT ON inferq.task REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION inferq.ensure_fair_share();

INSERT INTO inferq.schema_migration (version, name) VALUES (6, '0006_scheduling');
COMMIT;
