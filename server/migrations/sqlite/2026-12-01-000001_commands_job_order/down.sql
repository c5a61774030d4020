DROP INDEX commands_job;
CREATE INDEX commands_job ON commands (job_id, held, status) WHERE job_id IS NOT NULL;
