DROP INDEX rollout_agents_finished;
ALTER TABLE rollout_agents DROP COLUMN error;
DROP TABLE rollout_brakes;
DROP INDEX rollouts_one_current;
UPDATE rollouts SET status = 'cancelled' WHERE status = 'paused';
CREATE UNIQUE INDEX rollouts_one_active ON rollouts (os, arch) WHERE status = 'active';
ALTER TABLE rollouts DROP COLUMN reason;
ALTER TABLE rollouts DROP COLUMN allow_downgrade;
