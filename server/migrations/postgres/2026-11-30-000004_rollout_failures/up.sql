-- Rollouts learn how updates end (agents report `update_result` from protocol version 2),
-- pause on a failure brake like fleet jobs, and may be rollbacks.

-- `paused`: the failure brake (or an operator) stopped offering the build; `reason` says
-- why. allow_downgrade: a rollback, offered to agents on a newer version too.
ALTER TABLE rollouts ADD COLUMN allow_downgrade BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE rollouts ADD COLUMN reason TEXT;

-- A paused rollout is still its platform's rollout: a new one supersedes it.
DROP INDEX rollouts_one_active;
CREATE UNIQUE INDEX rollouts_one_current ON rollouts (os, arch) WHERE status IN ('active', 'paused');

-- The failure brake of a rollout that has one: pause when (failed + timed out) ÷ finished
-- updates exceeds max_failure_ratio, once min_sample updates finished. Resuming starts a
-- new sample: judged_failed/judged_finished keep the counts already judged. Written only
-- in a transaction that first wrote the rollout's row.
CREATE TABLE rollout_brakes (
    rollout_id        TEXT   PRIMARY KEY REFERENCES rollouts (id) ON DELETE CASCADE,
    max_failure_ratio DOUBLE PRECISION NOT NULL,
    min_sample        BIGINT NOT NULL,
    judged_failed     BIGINT NOT NULL DEFAULT 0,
    judged_finished   BIGINT NOT NULL DEFAULT 0
);

-- `failed` (the agent's update_result) with the agent's reason.
ALTER TABLE rollout_agents ADD COLUMN error TEXT;
CREATE INDEX rollout_agents_finished ON rollout_agents (rollout_id, status, finished_at);
