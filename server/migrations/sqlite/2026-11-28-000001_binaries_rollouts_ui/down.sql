DROP TABLE ui_sessions;
DROP TABLE agent_labels;
DROP TABLE rollout_agents;
DROP TABLE rollouts;
DROP TABLE binaries;
