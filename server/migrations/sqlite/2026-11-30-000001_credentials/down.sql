DROP TABLE audit_log;
DROP TABLE enroll_secrets;
DROP TABLE api_tokens;
DROP TABLE agent_credentials;
