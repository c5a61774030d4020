DROP INDEX commands_open;
CREATE INDEX commands_open ON commands (agent_id, status) WHERE status IN ('pending', 'delivered');
DROP INDEX commands_job;
ALTER TABLE commands DROP COLUMN held;
ALTER TABLE commands DROP COLUMN job_id;
DROP TABLE job_pacing;
DROP TABLE jobs;
