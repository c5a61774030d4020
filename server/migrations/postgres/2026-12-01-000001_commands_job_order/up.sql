-- A job's held commands in client_id order straight from the index: a pacer turn takes
-- the first N of its agents' held commands without sorting every held one (the command
-- id is `<job id>.<client_id>`).
DROP INDEX commands_job;
CREATE INDEX commands_job ON commands (job_id, held, status, id) WHERE job_id IS NOT NULL;
