ALTER TABLE agent_labels DROP COLUMN source;
