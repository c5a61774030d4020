-- Fleet jobs: one command to many agents, paced by the store (see docs/operations.md).
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    name              TEXT    NOT NULL,
    args              TEXT    NOT NULL,
    -- The target as the operator gave it (JSON), for display.
    target            TEXT    NOT NULL,
    -- running | paused | cancelled | completed
    status            TEXT    NOT NULL,
    -- Why a job is paused (the failure brake) or ended.
    reason            TEXT,
    targeted          BIGINT  NOT NULL,
    -- Commands released first; the rest wait until every one of them is final.
    canary            BIGINT  NOT NULL,
    max_in_flight     BIGINT  NOT NULL,
    -- NULL: no rate limit.
    rate_per_second   BIGINT,
    -- NULL: no failure brake.
    max_failure_ratio DOUBLE PRECISION,
    min_sample        BIGINT  NOT NULL,
    expires_at        BIGINT,
    created_at        BIGINT  NOT NULL,
    ended_at          BIGINT,
    -- Commands expired by the cancel, told apart from those that reached their TTL.
    cancelled         BIGINT  NOT NULL DEFAULT 0
);

-- The pacers' state, written only in a turn or transition that first wrote the job's row.
CREATE TABLE job_pacing (
    job_id         TEXT   PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    -- Last pacer turn.
    updated_at     BIGINT NOT NULL,
    -- Commands released so far.
    released       BIGINT NOT NULL DEFAULT 0,
    -- Rate pacing: the virtual time (ms) up to which release credit has been spent.
    release_clock  BIGINT NOT NULL DEFAULT 0,
    -- Results already judged by the brake before the last resume.
    brake_failed   BIGINT NOT NULL DEFAULT 0,
    brake_finished BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_created ON jobs (created_at, id);
CREATE INDEX jobs_running ON jobs (status) WHERE status = 'running';

-- A job's per-agent command is an ordinary command row that is held until the pacer
-- releases it. Sessions read only rows that are not held. job_id has no foreign key on
-- purpose: jobs are never deleted, and a per-row check of the one job row would cost
-- every one of a 20,000-agent job's inserts.
ALTER TABLE commands ADD COLUMN job_id TEXT;
ALTER TABLE commands ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX commands_job ON commands (job_id, held, status) WHERE job_id IS NOT NULL;
DROP INDEX commands_open;
CREATE INDEX commands_open ON commands (agent_id, held, status) WHERE status IN ('pending', 'delivered');
