-- Where an agent's label came from: 'hello' (the agent reports it; each hello replaces
-- these) or 'enroll' (its enroll secret gave it; hellos leave these alone).
ALTER TABLE agent_labels ADD COLUMN source TEXT NOT NULL DEFAULT 'hello';
